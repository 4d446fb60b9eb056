"""What the ledger holds and what the local SendGrid API received, for flow tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import select

from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import send_ledger


def ledger_rows() -> list[Any]:
    """Every ledger row of the configured warehouse, oldest first."""
    with get_engine().connect() as conn:
        return list(conn.execute(select(send_ledger).order_by(send_ledger.c.id)))


def sent_per_ledger_id(sink: Any) -> Counter[str]:
    """How many accepted messages the local API holds per ledger id (all pages)."""
    accepted: list[dict[str, Any]] = []
    while page := sink.messages(limit=1000, offset=len(accepted)):
        accepted += page
    return Counter(
        m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in accepted
    )
