"""Thin Prefect task wrappers around the sd2_core stage recipes."""
