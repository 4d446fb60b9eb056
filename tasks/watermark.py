"""Watermarks of event-based triggers (``mf_watermarks``): read before a run, advance after."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow import watermarks
from mailflow.warehouse.engine import get_engine


@task(name="read-watermark", cache_policy=NONE, persist_result=False)
def read_watermark(name: str) -> datetime | None:
    """Where trigger ``name`` got to (``None`` before its first clean run)."""
    with get_engine().connect() as conn:
        value = watermarks.read(conn, name)
    get_run_logger().info(
        "%s: watermark %s", name, value.isoformat() if value else "not set yet (first run)"
    )
    return value


@task(name="advance-watermark", cache_policy=NONE, persist_result=False)
def advance_watermark(name: str, to: datetime, flow_run_id: str | None) -> datetime:
    """Move trigger ``name``'s watermark forward to ``to``; an overlapping run never moves
    it back. Called only after a run finished cleanly."""
    with get_engine().begin() as conn:
        stored = watermarks.advance(conn, name, to, flow_run_id=flow_run_id)
    get_run_logger().info("%s: watermark now %s", name, stored.isoformat())
    return stored
