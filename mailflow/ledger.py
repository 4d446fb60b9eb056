"""The send ledger: the one place that decides whether a message may go.

Every planned message gets a row, unique on its dedupe key, *before* anything is
sent. A row moves::

    planned ──claim──> sending ──> sent | failed | unknown
       ^                  │
       └── retry later ───┘  (429/5xx exhausted, or the run stopped on a bad key)

``claim`` is a compare-and-set (``UPDATE … WHERE status = 'planned'``), so of two
overlapping runs only one can take a row; a row in ``sending`` is never sent again.
A row left in ``sending`` by a crashed run is moved to ``unknown`` once its lease
has expired (it may or may not have reached the provider), never resent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, select, update

from mailflow.clock import utcnow
from mailflow.mailer.base import Outcome, SendResult
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import send_ledger

#: How long a claimed row may stay in ``sending`` before a later run calls it unknown.
DEFAULT_LEASE = timedelta(minutes=30)
_CHUNK = 5_000


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    """One message the plan stage wants to send."""

    dedupe_key: str
    email: str
    customer_id: int | None
    variant: str | None
    context: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A ledger row this run now owns and must settle."""

    id: int
    dedupe_key: str
    email: str
    customer_id: int | None
    variant: str | None
    context: dict[str, Any]


def plan(
    conn: Connection, trigger: str, messages: Iterable[PlannedMessage], *, flow_run_id: str | None
) -> int:
    """Write a ``planned`` row per message; keys already in the ledger are left alone.

    Returns the number of rows offered (conflicting keys are silently kept as they were:
    they belong to an earlier or concurrent run, which settles them).
    """
    now = utcnow()
    stmt = insert_ignoring_conflicts(conn, send_ledger)
    offered = 0
    chunk: list[dict[str, Any]] = []
    for m in messages:
        chunk.append(
            {
                "dedupe_key": m.dedupe_key,
                "trigger": trigger,
                "customer_id": m.customer_id,
                "email": m.email,
                "variant": m.variant,
                "status": "planned",
                "attempts": 0,
                "context": dict(m.context),
                "flow_run_id": flow_run_id,
                "created_at": now,
                "updated_at": now,
            }
        )
        if len(chunk) >= _CHUNK:
            conn.execute(stmt, chunk)
            offered += len(chunk)
            chunk = []
    if chunk:
        conn.execute(stmt, chunk)
        offered += len(chunk)
    return offered


def planned_ids(conn: Connection, trigger: str) -> list[int]:
    """Ids of every row of ``trigger`` still waiting to be sent, oldest first."""
    rows = conn.execute(
        select(send_ledger.c.id)
        .where(send_ledger.c.trigger == trigger, send_ledger.c.status == "planned")
        .order_by(send_ledger.c.id)
    )
    return [r[0] for r in rows]


def expire_stale_claims(conn: Connection, trigger: str, *, lease: timedelta = DEFAULT_LEASE) -> int:
    """Rows stuck in ``sending`` past their lease (a crashed run) become ``unknown``."""
    now = utcnow()
    result = conn.execute(
        update(send_ledger)
        .where(
            send_ledger.c.trigger == trigger,
            send_ledger.c.status == "sending",
            send_ledger.c.claimed_at < now - lease,
        )
        .values(
            status="unknown",
            reason="the run that was sending this stopped before recording an answer; "
            "delivery unknown, not resent (check the provider's activity feed)",
            updated_at=now,
        )
    )
    return result.rowcount or 0


def claim(conn: Connection, ids: Sequence[int], *, flow_run_id: str | None) -> list[ClaimedMessage]:
    """Take the ``planned`` rows among ``ids`` for this run; rows others hold are skipped."""
    now = utcnow()
    claimed: list[ClaimedMessage] = []
    cols = send_ledger.c
    for start in range(0, len(ids), _CHUNK):
        part = list(ids[start : start + _CHUNK])
        rows = conn.execute(
            update(send_ledger)
            .where(cols.id.in_(part), cols.status == "planned")
            .values(
                status="sending",
                attempts=cols.attempts + 1,
                claimed_at=now,
                updated_at=now,
                flow_run_id=flow_run_id,
            )
            .returning(
                cols.id, cols.dedupe_key, cols.email, cols.customer_id, cols.variant, cols.context
            )
        )
        claimed.extend(
            ClaimedMessage(r.id, r.dedupe_key, r.email, r.customer_id, r.variant, r.context)
            for r in rows
        )
    claimed.sort(key=lambda c: c.id)
    return claimed


_STATUS_OF = {
    Outcome.SENT: "sent",
    Outcome.FAILED: "failed",
    Outcome.UNKNOWN: "unknown",
    Outcome.RETRY: "planned",
}


def settle(conn: Connection, results: Iterable[SendResult]) -> None:
    """Record the provider's answers on rows this run holds (``sending``).

    ``RETRY`` puts the row back to ``planned`` with the reason, so a task retry or
    the next run sends it; everything else is final.
    """
    now = utcnow()
    cols = send_ledger.c
    stmt = (
        update(send_ledger)
        .where(cols.id == bindparam("b_id"), cols.status == "sending")
        .values(
            status=bindparam("b_status"),
            reason=bindparam("b_reason"),
            provider_message_id=bindparam("b_message_id"),
            sent_at=bindparam("b_sent_at"),
            updated_at=now,
        )
    )
    params = [
        {
            "b_id": r.ledger_id,
            "b_status": _STATUS_OF[r.outcome],
            "b_reason": r.reason,
            "b_message_id": r.message_id,
            "b_sent_at": now if r.outcome is Outcome.SENT else None,
        }
        for r in results
    ]
    for start in range(0, len(params), _CHUNK):
        conn.execute(stmt, params[start : start + _CHUNK])


def release(conn: Connection, ids: Sequence[int], *, reason: str) -> None:
    """Give rows this run holds back to ``planned`` (nothing was sent for them)."""
    if not ids:
        return
    now = utcnow()
    cols = send_ledger.c
    for start in range(0, len(ids), _CHUNK):
        conn.execute(
            update(send_ledger)
            .where(cols.id.in_(list(ids[start : start + _CHUNK])), cols.status == "sending")
            .values(status="planned", reason=reason, updated_at=now)
        )


def status_counts(
    conn: Connection, *, trigger: str, flow_run_id: str | None = None
) -> dict[str, int]:
    """Rows per status for a trigger (and run, when given)."""
    cond = [send_ledger.c.trigger == trigger]
    if flow_run_id is not None:
        cond.append(send_ledger.c.flow_run_id == flow_run_id)
    rows = conn.execute(
        select(send_ledger.c.status, func.count()).where(and_(*cond)).group_by(send_ledger.c.status)
    )
    return {status: n for status, n in rows}
