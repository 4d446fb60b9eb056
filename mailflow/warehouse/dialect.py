"""Dialect helpers: the few statements SQLAlchemy Core spells differently per database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Insert
from sqlalchemy.dialects import postgresql, sqlite

__all__ = ["insert_ignoring_conflicts"]


def insert_ignoring_conflicts(conn: Connection, table: Any) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` for the connection's dialect."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(
        f"the warehouse dialect {name!r} has no insert-ignore here yet; "
        "use SQLite or PostgreSQL, or add it in mailflow/warehouse/dialect.py"
    )
