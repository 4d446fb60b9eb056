"""Deliverability guardrail: stop sending while bounces or complaints run too high.

Mailbox providers throttle or block senders whose complaint rate passes about 0.3 %
(Gmail's and Yahoo's bulk-sender rules) or whose bounce rate is high. Sending more
into that makes it worse, so sending flows refuse to start until the rates recover or
someone overrides the check on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, or_, select

from mailflow.errors import FatalRunError
from mailflow.ledger import Status
from mailflow.warehouse.schema import events, send_ledger


class GuardrailTripped(FatalRunError):
    """Recent bounce or complaint rate is above its threshold."""


@dataclass(frozen=True)
class Deliverability:
    """Rates over a recent window; a rate is a share of messages sent in it."""

    sent: int
    bounces: int
    complaints: int

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sent if self.sent else 0.0


def measure(conn: Connection, *, now: datetime, window: timedelta) -> Deliverability:
    """Messages sent in the window, and the hard bounces and spam reports among events."""
    since = now - window
    sent = conn.execute(
        select(func.count())
        .select_from(send_ledger)
        .where(send_ledger.c.status == Status.SENT, send_ledger.c.sent_at >= since)
    ).scalar_one()
    hard_bounce = (events.c.event == "bounce") & or_(
        events.c.bounce_type.is_(None), func.lower(events.c.bounce_type) != "blocked"
    )
    bounces = conn.execute(
        select(func.count()).select_from(events).where(hard_bounce, events.c.occurred_at >= since)
    ).scalar_one()
    complaints = conn.execute(
        select(func.count())
        .select_from(events)
        .where(events.c.event == "spamreport", events.c.occurred_at >= since)
    ).scalar_one()
    return Deliverability(sent=sent, bounces=bounces, complaints=complaints)


def check(
    d: Deliverability,
    *,
    max_bounce_rate: float,
    max_complaint_rate: float,
    min_sent: int,
) -> None:
    """Raise ``GuardrailTripped`` when a rate is above its threshold.

    Below ``min_sent`` messages the rates are too noisy to judge and pass.
    """
    if d.sent < min_sent:
        return
    problems = []
    if d.bounce_rate > max_bounce_rate:
        problems.append(
            f"bounce rate {d.bounce_rate:.2%} ({d.bounces} of {d.sent}) > {max_bounce_rate:.2%}"
        )
    if d.complaint_rate > max_complaint_rate:
        problems.append(
            f"complaint rate {d.complaint_rate:.2%} ({d.complaints} of {d.sent}) "
            f"> {max_complaint_rate:.2%}"
        )
    if problems:
        raise GuardrailTripped(
            "deliverability guardrail: "
            + "; ".join(problems)
            + ". Nothing was sent. Find the cause (mf_events, mf_suppressions: a bad list, a "
            "template that reads as spam), then rerun with override_guardrail=true to send "
            "anyway, or raise MAILFLOW_GUARDRAIL_MAX_BOUNCE_RATE / "
            "MAILFLOW_GUARDRAIL_MAX_COMPLAINT_RATE."
        )
