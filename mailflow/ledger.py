"""The send ledger: the one place that decides whether a message may go.

Every planned message gets a row in ``mf_send_ledger``, unique on its dedupe key,
*before* anything is sent. A row moves::

    planned ──claim──> sending ──> sent | failed | unknown ──(event)──> sent
     │ ^                  │                          │
     │ └── retry later ───┘                          │ no event within the grace period
     │ └─────────────────────────────────────────────┘ (never accepted): planned again
     └──(stale: too late, or no longer due)──> expired | skipped

``claim`` is a compare-and-set (``UPDATE … WHERE status = 'planned'``), so of two
overlapping runs only one can take a row; a row in ``sending`` is never sent again.
A row left in ``sending`` by a crashed run becomes ``unknown`` once its lease has expired
(it may or may not have reached the provider). Reconciliation resolves ``unknown``: a
provider event that names the row proves SendGrid accepted it (:func:`confirm_by_events`,
``sent``); a row no event names within the grace period, while events for later sends
did arrive, was never accepted and is planned again (:func:`requeue_unconfirmed`).
Every such decision is kept in ``mf_ledger_history``.

This module owns every statement on ``mf_send_ledger`` that writes or decides: plan,
claim, settle, release, expire, the run's tally, the stop mark (``mf_run_stops``) and
the eligibility rules extraction puts into its SQL (:func:`already_notified`,
:func:`notified_since`, :func:`marketing_count_since`). Reporting modules read the table
for their numbers only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from mailflow.clock import utcnow
from mailflow.mailer.base import Outcome, SendResult
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import events, ledger_history, run_stops, send_ledger


class Status(StrEnum):
    """The state of one ledger row (``mf_send_ledger.status``)."""

    HELD = "held"  # planned by a run whose audience is still being validated; not yet sendable
    PLANNED = "planned"  # written before sending; safe to send
    SENDING = "sending"  # claimed by a run; never sent again by another
    SENT = "sent"  # accepted by the provider (202), with its message id
    FAILED = "failed"  # refused for good (400, a render error), with the reason
    UNKNOWN = "unknown"  # may have reached the provider (timeout, crash): not resent blindly
    SKIPPED = "skipped"  # planned, then no longer due (suppressed, bought, cancelled): not sent
    EXPIRED = "expired"  # planned, then too late to send (past the trigger's max_delay)


#: States in which a row counts as "this recipient has heard (or will hear) from us".
NOTIFIED = (Status.HELD, Status.PLANNED, Status.SENDING, Status.SENT, Status.UNKNOWN)

#: The reason on rows a run hands back when it stops on a refused key.
STOPPED_REASON = "not sent: run stopped"

#: The reason on rows handed back because the recipient's send window opens beyond
#: SendGrid's 72 h ``send_at`` limit: a later run sends them, by design.
DEFERRED_REASON = "deferred: outside the recipient's send window; a later run sends it"

#: How long a claimed row may stay in ``sending`` before a later run calls it unknown.
LEASE = timedelta(minutes=30)
_CHUNK = 5_000


# --- eligibility: SQL expressions extraction puts into its exclusion CASE ----------------


def already_notified(dedupe_key: Any) -> ColumnElement[bool]:
    """This dedupe key has a ledger row (in any state): never plan it again."""
    return exists().where(send_ledger.c.dedupe_key == dedupe_key)


def notified_since(
    trigger: str, since: datetime, *, customer_id: Any = None, email: Any = None
) -> ColumnElement[bool]:
    """This customer (or this lower-cased address) got ``trigger`` at or after ``since``."""
    cols = send_ledger.c
    who = cols.customer_id == customer_id if email is None else cols.email == email
    return exists().where(
        who, cols.trigger == trigger, cols.created_at >= since, cols.status.in_(NOTIFIED)
    )


def marketing_count_since(customer_id: Any, since: datetime, *, marketing: Any) -> Any:
    """Messages planned or sent to ``customer_id`` since ``since`` whose trigger is marketing.

    ``marketing`` is a condition on ``mf_send_ledger.trigger`` (which triggers and
    campaigns are marketing); the result is a scalar subquery.
    """
    cols = send_ledger.c
    return (
        select(func.count())
        .select_from(send_ledger)
        .where(
            cols.customer_id == customer_id,
            cols.created_at >= since,
            cols.status.in_(NOTIFIED),
            marketing(cols.trigger),
        )
        .scalar_subquery()
    )


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
    conn: Connection,
    trigger: str,
    messages: Iterable[PlannedMessage],
    *,
    flow_run_id: str | None,
    status: Status = Status.PLANNED,
) -> int:
    """Write a ``planned`` row per message; keys already in the ledger are left alone.

    With ``status=HELD`` the rows wait for the run's data-quality gate
    (:func:`promote_held` or :func:`withdraw_held`). Returns the number of rows offered
    (conflicting keys are silently kept as they were: they belong to an earlier or
    concurrent run, which settles them).
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
                "status": status,
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


def _held(trigger: str, flow_run_id: str | None) -> ColumnElement[bool]:
    cols = send_ledger.c
    run = cols.flow_run_id.is_(None) if flow_run_id is None else cols.flow_run_id == flow_run_id
    return and_(cols.trigger == trigger, cols.status == Status.HELD, run)


def promote_held(conn: Connection, trigger: str, flow_run_id: str | None) -> int:
    """The run's gate passed: its held rows become ``planned`` (sendable). How many."""
    result = conn.execute(
        update(send_ledger)
        .where(_held(trigger, flow_run_id))
        .values(status=Status.PLANNED, updated_at=utcnow())
    )
    return result.rowcount


def withdraw_held(conn: Connection, trigger: str, flow_run_id: str | None) -> int:
    """The run's gate failed: delete its held rows (nothing was sent), so a later run
    extracts and validates those recipients afresh. How many."""
    return conn.execute(delete(send_ledger).where(_held(trigger, flow_run_id))).rowcount


def clear_stale_holds(conn: Connection, trigger: str, flow_run_id: str | None) -> int:
    """Delete held rows a stopped run left: an earlier attempt of this run (a Prefect flow
    retry keeps its id), or any run whose hold is older than :data:`LEASE`. Nothing was
    sent for them; this run extracts and validates them again. How many."""
    cols = send_ledger.c
    stale = cols.updated_at < utcnow() - LEASE
    if flow_run_id is not None:
        stale = or_(stale, cols.flow_run_id == flow_run_id)
    return conn.execute(
        delete(send_ledger).where(cols.trigger == trigger, cols.status == Status.HELD, stale)
    ).rowcount


def planned_ids(conn: Connection, trigger: str) -> list[int]:
    """Ids of every row of ``trigger`` still waiting to be sent, oldest first."""
    rows = conn.execute(
        select(send_ledger.c.id)
        .where(send_ledger.c.trigger == trigger, send_ledger.c.status == Status.PLANNED)
        .order_by(send_ledger.c.id)
    )
    return [r[0] for r in rows]


def _decide(
    conn: Connection,
    decisions: Sequence[Mapping[str, Any]],
    *,
    from_states: Sequence[Status],
    decision: str,
    flow_run_id: str | None,
) -> int:
    """Move rows (``id``, ``status`` and optional ``reason``, ``provider_message_id``,
    ``sent_at``) out of ``from_states``, one compare-and-set each, and keep each move that
    happened in ``mf_ledger_history``. Returns how many moved."""
    now = utcnow()
    cols = send_ledger.c
    moved: list[dict[str, Any]] = []
    for d in decisions:
        values: dict[str, Any] = {
            "status": d["status"],
            "reason": d.get("reason"),
            "updated_at": now,
        }
        for optional in ("provider_message_id", "sent_at"):
            if d.get(optional) is not None:
                values[optional] = d[optional]
        row = conn.execute(
            update(send_ledger)
            .where(cols.id == d["id"], cols.status.in_(list(from_states)))
            .values(**values)
            .returning(cols.id)
        ).first()
        if row is not None:
            moved.append(
                {
                    "ledger_id": d["id"],
                    "from_status": d["from_status"],
                    "to_status": d["status"],
                    "decision": decision,
                    "reason": d.get("reason"),
                    "flow_run_id": flow_run_id,
                    "at": now,
                }
            )
    if moved:
        conn.execute(ledger_history.insert(), moved)
    return len(moved)


def _move(
    conn: Connection,
    ids: Sequence[int],
    from_status: Status,
    to_status: Status,
    reason: str,
    decision: str,
    flow_run_id: str | None,
) -> int:
    """Move ``ids`` from one state to another with one reason (see :func:`_decide`)."""
    return _decide(
        conn,
        [{"id": i, "from_status": from_status, "status": to_status, "reason": reason} for i in ids],
        from_states=[from_status],
        decision=decision,
        flow_run_id=flow_run_id,
    )


def expire_stale_claims(
    conn: Connection,
    trigger: str | None,
    *,
    lease: timedelta = LEASE,
    flow_run_id: str | None = None,
) -> int:
    """Rows stuck in ``sending`` past their lease (a crashed run) become ``unknown``.

    ``trigger`` None: every trigger's rows.
    """
    cols = send_ledger.c
    cond = [cols.status == Status.SENDING, cols.claimed_at < utcnow() - lease]
    if trigger is not None:
        cond.append(cols.trigger == trigger)
    ids = conn.execute(select(cols.id).where(*cond)).scalars().all()
    reason = (
        "the run that was sending this stopped before recording an answer; unknown until "
        "a provider event confirms it or the grace period ends"
    )
    return _move(conn, ids, Status.SENDING, Status.UNKNOWN, reason, "lease_expired", flow_run_id)


def _message_id(sg_message_id: str | None) -> str | None:
    """The ``X-Message-Id`` part of an event's ``sg_message_id`` (``<id>.filter…``)."""
    return sg_message_id.split(".", 1)[0] if sg_message_id else None


def confirm_by_events(
    conn: Connection,
    *,
    ledger_ids: Iterable[int] | None = None,
    trigger: str | None = None,
    flow_run_id: str | None = None,
) -> int:
    """``unknown`` rows that a provider event names were accepted by the provider: they
    become ``sent``, with the message id from the event. (A row still ``sending`` is left
    to the run holding it, or to :func:`expire_stale_claims` once that run is gone.)

    Any event counts (``processed``, ``delivered``, ``deferred``, ``bounce``, ``dropped``,
    ...): SendGrid only reports on messages it accepted. ``ledger_ids`` limits the check to
    those rows (the webhook passes the ids of the events it just stored); ``trigger``
    to one trigger's rows. Returns how many rows were confirmed.
    """
    cols, ev = send_ledger.c, events.c
    first_event = select(func.min(ev.id)).where(ev.ledger_id == cols.id).scalar_subquery()
    base = select(cols.id, cols.status, cols.claimed_at, first_event.label("event_id")).where(
        cols.status == Status.UNKNOWN
    )
    if trigger is not None:
        base = base.where(cols.trigger == trigger)
    found: list[Any] = []
    if ledger_ids is None:
        found = [r for r in conn.execute(base) if r.event_id is not None]
    else:
        ids = sorted(set(ledger_ids))
        for start in range(0, len(ids), _CHUNK):
            part = conn.execute(base.where(cols.id.in_(ids[start : start + _CHUNK])))
            found.extend(r for r in part if r.event_id is not None)
    if not found:
        return 0
    event_of = {
        e.id: e
        for start in range(0, len(found), _CHUNK)
        for e in conn.execute(
            select(ev.id, ev.event, ev.occurred_at, ev.sg_message_id).where(
                ev.id.in_([r.event_id for r in found[start : start + _CHUNK]])
            )
        )
    }
    now = utcnow()
    decisions = []
    for r in found:
        e = event_of[r.event_id]
        decisions.append(
            {
                "id": r.id,
                "from_status": r.status,
                "status": Status.SENT,
                "reason": f"confirmed by event {e.event} at {e.occurred_at.isoformat()}Z",
                "provider_message_id": _message_id(e.sg_message_id),
                "sent_at": r.claimed_at or now,
            }
        )
    return _decide(
        conn, decisions, from_states=[Status.UNKNOWN], decision="confirmed", flow_run_id=flow_run_id
    )


def requeue_unconfirmed(
    conn: Connection, trigger: str, *, grace: timedelta, flow_run_id: str | None = None
) -> int:
    """``unknown`` rows of ``trigger`` that no provider event named within ``grace`` of
    their last attempt were never accepted: they go back to ``planned`` to be sent once.

    Only while events demonstrably arrive: some event was received after the row's last
    attempt. If the webhook has gone quiet, nothing is requeued (it could be the webhook
    that is missing, not the message).
    """
    cols, ev = send_ledger.c, events.c
    cutoff = utcnow() - grace
    ids = (
        conn.execute(
            select(cols.id).where(
                cols.trigger == trigger,
                cols.status == Status.UNKNOWN,
                cols.claimed_at < cutoff,
                ~exists().where(ev.ledger_id == cols.id),
                exists().where(ev.received_at > cols.claimed_at),
            )
        )
        .scalars()
        .all()
    )
    reason = (
        f"no provider event named it within {grace} of its last attempt: never accepted; "
        "planned again"
    )
    return _move(conn, ids, Status.UNKNOWN, Status.PLANNED, reason, "resend", flow_run_id)


def unresolved(conn: Connection, trigger: str | None = None) -> int:
    """Rows still ``unknown`` (of ``trigger``, or of every trigger)."""
    cond = [send_ledger.c.status == Status.UNKNOWN]
    if trigger is not None:
        cond.append(send_ledger.c.trigger == trigger)
    return conn.execute(select(func.count()).select_from(send_ledger).where(*cond)).scalar_one()


@dataclass(frozen=True, slots=True)
class WaitingRow:
    """A planned row an earlier run left behind, to be re-checked before it goes."""

    id: int
    dedupe_key: str
    email: str
    customer_id: int | None
    created_at: datetime


def planned_by_earlier_runs(
    conn: Connection, trigger: str, flow_run_id: str | None
) -> list[WaitingRow]:
    """Planned rows of ``trigger`` that another run planned or handed back."""
    cols = send_ledger.c
    cond = [cols.trigger == trigger, cols.status == Status.PLANNED]
    if flow_run_id is not None:
        cond.append(or_(cols.flow_run_id.is_(None), cols.flow_run_id != flow_run_id))
    rows = conn.execute(
        select(cols.id, cols.dedupe_key, cols.email, cols.customer_id, cols.created_at)
        .where(*cond)
        .order_by(cols.id)
    )
    return [WaitingRow(r.id, r.dedupe_key, r.email, r.customer_id, r.created_at) for r in rows]


def settle_stale(
    conn: Connection, decisions: Sequence[tuple[int, Status, str]], *, flow_run_id: str | None
) -> int:
    """Planned rows that must not go: ``expired`` or ``skipped`` with the reason."""
    return _decide(
        conn,
        [
            {"id": i, "from_status": Status.PLANNED, "status": st, "reason": why}
            for i, st, why in decisions
        ],
        from_states=[Status.PLANNED],
        decision="stale",
        flow_run_id=flow_run_id,
    )


# The send path's statements, built once: a batch runs them once per group of
# ``MAILFLOW_SETTLE_EVERY`` rows, and building a Core statement (coercing each clause,
# then its cache key) cost more than SQLite took to run it. Values are bound per call.
_cols = send_ledger.c
_CLAIM = (
    update(send_ledger)
    .where(_cols.id.in_(bindparam("b_ids", expanding=True)), _cols.status == Status.PLANNED)
    .values(
        status=Status.SENDING,
        attempts=_cols.attempts + 1,
        claimed_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        flow_run_id=bindparam("b_run"),
    )
    .returning(
        _cols.id, _cols.dedupe_key, _cols.email, _cols.customer_id, _cols.variant, _cols.context
    )
)
_SETTLE = (
    update(send_ledger)
    .where(_cols.id == bindparam("b_id"), _cols.status == Status.SENDING)
    .values(
        status=bindparam("b_status"),
        reason=bindparam("b_reason"),
        provider_message_id=bindparam("b_message_id"),
        sent_at=bindparam("b_sent_at"),
        updated_at=bindparam("b_now"),
    )
)
_RELEASE = (
    update(send_ledger)
    .where(_cols.id.in_(bindparam("b_ids", expanding=True)), _cols.status == Status.SENDING)
    .values(status=Status.PLANNED, reason=bindparam("b_reason"), updated_at=bindparam("b_now"))
)


def claim(conn: Connection, ids: Sequence[int], *, flow_run_id: str | None) -> list[ClaimedMessage]:
    """Take the ``planned`` rows among ``ids`` for this run; rows others hold are skipped."""
    now = utcnow()
    claimed: list[ClaimedMessage] = []
    for start in range(0, len(ids), _CHUNK):
        rows = conn.execute(
            _CLAIM,
            {"b_ids": list(ids[start : start + _CHUNK]), "b_now": now, "b_run": flow_run_id},
        )
        claimed.extend(ClaimedMessage(*row) for row in rows)
    claimed.sort(key=lambda c: c.id)
    return claimed


_STATUS_OF = {
    Outcome.SENT: Status.SENT,
    Outcome.FAILED: Status.FAILED,
    Outcome.UNKNOWN: Status.UNKNOWN,
    Outcome.RETRY: Status.PLANNED,
}


def settle(conn: Connection, results: Iterable[SendResult]) -> None:
    """Record the provider's answers on rows this run holds (``sending``).

    ``RETRY`` puts the row back to ``planned`` with the reason, so a task retry or
    the next run sends it; everything else is final. (An ``unknown`` whose provider
    event has already arrived — events can beat a late answer — is confirmed by the
    caller right after this commits: :func:`confirm_by_events`.)
    """
    now = utcnow()
    params = [
        {
            "b_id": r.ledger_id,
            "b_status": _STATUS_OF[r.outcome],
            "b_reason": r.reason,
            "b_message_id": r.message_id,
            "b_sent_at": now if r.outcome is Outcome.SENT else None,
            "b_now": now,
        }
        for r in results
    ]
    for start in range(0, len(params), _CHUNK):
        conn.execute(_SETTLE, params[start : start + _CHUNK])


def release(conn: Connection, ids: Sequence[int], *, reason: str) -> None:
    """Give rows this run holds back to ``planned`` (nothing was sent for them)."""
    if not ids:
        return
    now = utcnow()
    for start in range(0, len(ids), _CHUNK):
        conn.execute(
            _RELEASE,
            {"b_ids": list(ids[start : start + _CHUNK]), "b_reason": reason, "b_now": now},
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


def _short(reason: str | None) -> str:
    text = (reason or "no reason recorded").strip().splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class Tally:
    """One run's ledger rows of one trigger: counts per status, failures per reason."""

    statuses: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    deferred: int = 0  # planned on purpose: waiting for the recipient's send window

    @property
    def pending(self) -> int:
        """Rows this run touched that are not settled: a later run sends them."""
        return self.statuses.get(Status.PLANNED, 0) + self.statuses.get(Status.SENDING, 0)


def tally(conn: Connection, trigger: str, flow_run_id: str | None) -> Tally:
    """The rows of ``trigger`` this run planned or claimed, by status and failure reason.

    Every row a run tries carries its run id (plan writes it, claim overwrites it), so
    rows an earlier run left planned and this run handed back count as this run's.
    """
    cols = send_ledger.c
    run = (cols.trigger == trigger, cols.flow_run_id == flow_run_id)
    statuses = {
        str(status): int(n)
        for status, n in conn.execute(
            select(cols.status, func.count()).where(*run).group_by(cols.status)
        )
    }
    failed: Counter[str] = Counter()
    for reason, n in conn.execute(
        select(cols.reason, func.count())
        .where(*run, cols.status == Status.FAILED)
        .group_by(cols.reason)
    ):
        failed[_short(reason)] += n
    deferred = conn.execute(
        select(func.count()).where(
            *run, cols.status == Status.PLANNED, cols.reason == DEFERRED_REASON
        )
    ).scalar_one()
    return Tally(statuses=statuses, failed=dict(failed), deferred=int(deferred))


@dataclass(frozen=True, slots=True)
class RunErrors:
    """A run's answered messages and, of those, permanent failures and bounces so far."""

    answered: int
    failed: int
    bounced: int

    @property
    def bad(self) -> int:
        return self.failed + self.bounced


def bounced_since(conn: Connection, since: datetime) -> bool:
    """Whether any bounce or drop event was received at or after ``since``."""
    ev = events.c
    stmt = select(exists().where(ev.received_at >= since, ev.event.in_(["bounce", "dropped"])))
    return bool(conn.execute(stmt).scalar())


def run_errors(conn: Connection, trigger: str, flow_run_id: str) -> RunErrors:
    """Count what the error budget judges: this run's rows answered (sent, failed,
    unknown), refused for good, and sent but bounced or dropped (events so far)."""
    cols, ev = send_ledger.c, events.c
    run = (cols.trigger == trigger, cols.flow_run_id == flow_run_id)
    answered, failed = conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((cols.status == Status.FAILED, 1), else_=0)), 0),
        ).where(*run, cols.status.in_([Status.SENT, Status.FAILED, Status.UNKNOWN]))
    ).one()
    bounced = conn.execute(
        select(func.count(func.distinct(ev.ledger_id)))
        .select_from(events.join(send_ledger, cols.id == ev.ledger_id))
        .where(*run, cols.status == Status.SENT, ev.event.in_(["bounce", "dropped"]))
    ).scalar_one()
    return RunErrors(int(answered), int(failed), int(bounced))


# --- the stop mark: a run that hit a refused key ------------------------------------------


def mark_stopped(conn: Connection, flow_run_id: str | None, reason: str) -> None:
    """Record that the run stopped; its batches elsewhere must not send any more."""
    if flow_run_id is None:
        return
    conn.execute(
        insert_ignoring_conflicts(conn, run_stops).values(
            flow_run_id=flow_run_id, reason=reason, stopped_at=utcnow()
        )
    )


def is_stopped(conn: Connection, flow_run_id: str) -> bool:
    """Did a batch of this run, in any process, stop it (a refused key)?"""
    found = conn.execute(
        select(run_stops.c.flow_run_id).where(run_stops.c.flow_run_id == flow_run_id)
    ).first()
    return found is not None
