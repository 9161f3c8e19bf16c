"""Deployment helpers for sd2's Prefect flows."""
