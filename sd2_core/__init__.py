"""sd2_core: the science and plumbing of SD² (self-distilled sparse drafters), free of Prefect."""

__version__ = "0.1.0"
