"""The warehouse's clock: naive UTC, the convention of every timestamp column."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utcnow"]


def utcnow() -> datetime:
    """Naive UTC now (the warehouse convention)."""
    return datetime.now(UTC).replace(tzinfo=None)
