"""Resolve every ambiguous send, and never send a stale one.

A send is ambiguous when the request may have reached SendGrid but no answer came back
(a timeout, a dropped connection, a crash mid-batch): the ledger row is ``unknown``
(a crashed run's rows stay ``sending`` until their lease ends, then become ``unknown``).
SendGrid has no idempotency key, but it posts an event for every message it accepted,
and every message carries its ledger id in ``custom_args``. So:

- a row an event names was accepted: ``sent`` (:func:`mailflow.ledger.confirm_by_events`;
  the webhook does this the moment the event arrives, the send stage when the late
  answer is settled after its event, every sending flow and the rollup again, in case
  the webhook missed it);
- a row no event names within ``MAILFLOW_RECONCILE_GRACE_S`` of its last attempt, while
  events for other sends did arrive, was never accepted: ``planned`` again, and this run
  sends it once — but only when ``MAILFLOW_EVENT_WEBHOOK`` says the webhook is set up.
  Without it nothing is resent, and the summary says so.

Rows an earlier run planned (left behind by a 401, by 429s that ran out, by a crash, or
handed back by reconciliation) are re-checked before they go (:func:`recheck`): too late
for the trigger (``max_delay``) → ``expired``; the address is suppressed, consent was
withdrawn, or the trigger's condition no longer holds (the cart was bought, the order
cancelled) → ``skipped``. Each decision is counted and kept in ``mf_ledger_history``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, false, select

from mailflow import ledger
from mailflow.extract import MARKETING_ONLY_SUPPRESSIONS
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger
from mailflow.warehouse.schema import customers, suppressions

_CHUNK = 5_000

#: Said in the summary when ambiguous sends cannot be resolved by resending.
NO_WEBHOOK = (
    "MAILFLOW_EVENT_WEBHOOK is not set: ambiguous sends are confirmed by events when they "
    "arrive, but never resent (set it once SendGrid's Event Webhook posts to `mailflow webhook`)"
)


@dataclass
class Reconciled:
    """What reconciliation and the stale re-check decided in one run."""

    confirmed: int = 0  # ambiguous → sent: an event proves SendGrid accepted it
    resent: int = 0  # unknown → planned: no event within the grace period; sent again
    lease_expired: int = 0  # sending past the lease (a crashed run) → unknown
    unresolved: int = 0  # still unknown after this pass
    stale: dict[str, int] = field(default_factory=dict)  # expired/skipped, by reason
    note: str | None = None  # e.g. the webhook is not configured

    def counts(self) -> dict[str, int]:
        """Non-zero counts by decision, for the summary."""
        out = {
            "confirmed by event": self.confirmed,
            "sent again (never accepted)": self.resent,
            "lease expired (crashed run)": self.lease_expired,
        }
        out.update({f"not sent: {k}": v for k, v in self.stale.items()})
        return {k: v for k, v in out.items() if v}


def resolve(res: Resources, trigger: str | None, *, flow_run_id: str | None = None) -> Reconciled:
    """Confirm ambiguous sends by their events, expire dead claims, requeue the never
    accepted (when the webhook is configured). ``trigger`` None: every trigger."""
    s = res.settings
    out = Reconciled()
    with res.engine.begin() as conn:
        out.lease_expired = ledger.expire_stale_claims(
            conn, trigger, lease=timedelta(seconds=s.claim_lease_s), flow_run_id=flow_run_id
        )
        out.confirmed = ledger.confirm_by_events(conn, trigger=trigger, flow_run_id=flow_run_id)
        if trigger is not None and s.event_webhook:
            out.resent = ledger.requeue_unconfirmed(
                conn,
                trigger,
                grace=timedelta(seconds=s.reconcile_grace_s),
                flow_run_id=flow_run_id,
            )
        out.unresolved = ledger.unresolved(conn, trigger)
    if out.unresolved and not s.event_webhook:
        out.note = NO_WEBHOOK
    return out


def _suppressed(conn: Connection, trigger: Trigger, emails: list[str]) -> set[str]:
    cond = [suppressions.c.email.in_(emails)]
    if trigger.kind != "marketing":
        cond.append(suppressions.c.reason.not_in(MARKETING_ONLY_SUPPRESSIONS))
    return set(conn.execute(select(suppressions.c.email).where(*cond).distinct()).scalars())


def _without_consent(conn: Connection, ids: list[int]) -> set[int]:
    stmt = select(customers.c.id).where(
        customers.c.id.in_(ids), customers.c.marketing_consent == false()
    )
    return set(conn.execute(stmt).scalars())


def _still_candidates(
    conn: Connection, trigger: Trigger, keys: list[str], now: datetime, params: Mapping[str, Any]
) -> set[str]:
    cand = trigger.candidates(now, params).subquery("candidates")
    stmt = select(cand.c.dedupe_key).where(cand.c.dedupe_key.in_(keys))
    return set(conn.execute(stmt).scalars())


def stale_reasons(
    conn: Connection,
    trigger: Trigger,
    rows: list[ledger.WaitingRow],
    *,
    now: datetime,
    params: Mapping[str, Any],
) -> list[tuple[int, ledger.Status, str]]:
    """Which of ``rows`` must not be sent any more, with the state and reason for each."""
    decisions: list[tuple[int, ledger.Status, str]] = []
    fresh: list[ledger.WaitingRow] = []
    for r in rows:
        if trigger.max_delay is not None and r.created_at < now - trigger.max_delay:
            why = (
                f"too late: planned {r.created_at:%Y-%m-%d %H:%M} UTC, "
                f"may go {trigger.max_delay} late at most"
            )
            decisions.append((r.id, ledger.Status.EXPIRED, why))
        else:
            fresh.append(r)
    for start in range(0, len(fresh), _CHUNK):
        part = fresh[start : start + _CHUNK]
        gone = _suppressed(conn, trigger, sorted({r.email for r in part}))
        no_consent: set[int] = set()
        if trigger.kind == "marketing":
            no_consent = _without_consent(
                conn, sorted({r.customer_id for r in part if r.customer_id is not None})
            )
        due: set[str] | None = None
        if trigger.recheck_condition:
            due = _still_candidates(conn, trigger, [r.dedupe_key for r in part], now, params)
        for r in part:
            if r.email in gone:
                why = "suppressed since it was planned"
            elif r.customer_id in no_consent:
                why = "marketing consent withdrawn since it was planned"
            elif due is not None and r.dedupe_key not in due:
                why = f"no longer due: {trigger.stale_reason}"
            else:
                continue
            decisions.append((r.id, ledger.Status.SKIPPED, why))
    return decisions


def recheck(
    res: Resources,
    trigger: Trigger,
    *,
    now: datetime,
    params: Mapping[str, Any],
    flow_run_id: str | None,
) -> dict[str, int]:
    """Settle the stale ones among the planned rows earlier runs left; counts by reason."""
    with res.engine.begin() as conn:
        waiting = ledger.planned_by_earlier_runs(conn, trigger.name, flow_run_id)
        if not waiting:
            return {}
        decisions = stale_reasons(conn, trigger, waiting, now=now, params=params)
        ledger.settle_stale(conn, decisions, flow_run_id=flow_run_id)
    return dict(Counter(f"{status}: {why.split(':')[0]}" for _, status, why in decisions))
