"""Prefect flows: composition of sd2 tasks, no science."""
