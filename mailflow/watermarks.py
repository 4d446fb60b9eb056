"""Watermarks of event-based triggers, kept in the warehouse (table ``mf_watermarks``).

A watermark says where a trigger got to: the start (naive UTC) of its last run that
finished cleanly. The next run scans from the watermark minus the trigger's lookback,
so rows that land in the warehouse late (an ETL job that runs behind) are still seen.
Rescanning is safe: the dedupe key keeps a row that was already handled from being sent
again (``already_notified``).

:func:`advance` never moves a watermark back, so two overlapping runs that finish out of
order leave the later start. :func:`set_watermark` moves it anywhere, a replay included.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, select, update

from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import watermarks

__all__ = ["advance", "naive_utc", "read", "set_watermark"]


def naive_utc(value: datetime) -> datetime:
    """``value`` as naive UTC (the warehouse convention); an aware value is converted."""
    if not isinstance(value, datetime):
        raise ConfigError(
            f"watermark {value!r} is not a datetime; pass one like 2026-01-31T09:00:00Z"
        )
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def read(conn: Connection, name: str) -> datetime | None:
    """The watermark of ``name``, or ``None`` when it never finished a run."""
    return conn.execute(
        select(watermarks.c.watermark).where(watermarks.c.name == name)
    ).scalar_one_or_none()


def advance(
    conn: Connection, name: str, to: datetime, *, flow_run_id: str | None = None
) -> datetime:
    """Move the watermark of ``name`` forward to ``to`` (never back); returns the stored value.

    Compare-and-set in plain SQL, so it holds on every dialect and under concurrent runs.
    """
    to = naive_utc(to)
    cols = watermarks.c
    values = {"watermark": to, "flow_run_id": flow_run_id, "updated_at": utcnow()}
    # RETURNING rather than rowcount: an ignored insert's rowcount is -1 on psycopg.
    forward = (
        update(watermarks)
        .where(cols.name == name, cols.watermark < to)
        .values(**values)
        .returning(cols.name)
    )
    insert = (
        insert_ignoring_conflicts(conn, watermarks).values(name=name, **values).returning(cols.name)
    )
    for _ in range(2):
        if conn.execute(forward).first() is not None:
            return to
        if conn.execute(insert).first() is not None:
            return to
        # A row exists: it is already at or past ``to`` — or another run inserted it just
        # now with an older value, and the second pass moves it forward.
    stored = read(conn, name)
    assert stored is not None  # the insert above conflicted with it
    return stored


def set_watermark(
    conn: Connection, name: str, to: datetime, *, flow_run_id: str | None = None
) -> None:
    """Put the watermark of ``name`` at ``to``, earlier included (a replay)."""
    to = naive_utc(to)
    values = {"watermark": to, "flow_run_id": flow_run_id, "updated_at": utcnow()}
    moved = conn.execute(
        update(watermarks)
        .where(watermarks.c.name == name)
        .values(**values)
        .returning(watermarks.c.name)
    ).first()
    if moved is None:
        conn.execute(insert_ignoring_conflicts(conn, watermarks).values(name=name, **values))
