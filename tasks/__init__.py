"""Prefect tasks, one module per pipeline stage."""
