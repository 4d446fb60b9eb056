"""Prefect flows, one module per job."""
