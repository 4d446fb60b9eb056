"""Campaign rows in the warehouse: definitions, approvals and arm assignments."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, exists, insert, select, update

from mailflow.campaigns.model import Campaign
from mailflow.clock import utcnow
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import (
    campaign_approvals,
    campaign_assignments,
    campaigns,
    send_ledger,
)

_CHUNK = 5_000


def save_campaign(conn: Connection, campaign: Campaign) -> None:
    """Store (or replace) the campaign's definition under its name."""
    now = utcnow()
    values = {
        "trigger": campaign.trigger,
        "kind": campaign.kind,
        "template": campaign.template,
        "definition": campaign.definition(),
        "definition_hash": campaign.definition_hash(),
        "updated_at": now,
    }
    found = conn.execute(select(campaigns.c.name).where(campaigns.c.name == campaign.name)).first()
    if found is None:
        conn.execute(insert(campaigns).values(name=campaign.name, created_at=now, **values))
    else:
        conn.execute(update(campaigns).where(campaigns.c.name == campaign.name).values(**values))


def open_approval(
    conn: Connection,
    campaign: Campaign,
    *,
    flow_run_id: str | None,
    preview: Mapping[str, Any],
) -> int:
    """A ``pending`` approval request; returns its id."""
    result = conn.execute(
        insert(campaign_approvals)
        .values(
            campaign=campaign.name,
            flow_run_id=flow_run_id,
            definition_hash=campaign.definition_hash(),
            decision="pending",
            preview=dict(preview),
            requested_at=utcnow(),
        )
        .returning(campaign_approvals.c.id)
    )
    return int(result.scalar_one())


def decide_approval(
    conn: Connection,
    approval_id: int,
    *,
    decision: str,
    approver: str | None,
    comment: str | None,
) -> None:
    """Record who decided what, and when."""
    conn.execute(
        update(campaign_approvals)
        .where(campaign_approvals.c.id == approval_id)
        .values(decision=decision, approver=approver, comment=comment, decided_at=utcnow())
    )


def record_assignments(
    conn: Connection,
    campaign: str,
    arms: Mapping[int, str],
    *,
    at: datetime,
    flow_run_id: str | None,
) -> int:
    """One row per (campaign, customer); a customer assigned before keeps the first row."""
    stmt = insert_ignoring_conflicts(conn, campaign_assignments)
    rows = [
        {
            "campaign": campaign,
            "customer_id": cid,
            "arm": arm,
            "assigned_at": at,
            "flow_run_id": flow_run_id,
        }
        for cid, arm in arms.items()
    ]
    for start in range(0, len(rows), _CHUNK):
        conn.execute(stmt, rows[start : start + _CHUNK])
    return len(rows)


def recently_sent_campaigns(conn: Connection, *, since: datetime) -> list[str]:
    """Names of the campaigns that sent a message at or after ``since`` (read-only)."""
    sent_lately = exists().where(
        send_ledger.c.trigger == campaigns.c.trigger, send_ledger.c.sent_at >= since
    )
    rows = conn.execute(select(campaigns.c.name).where(sent_lately).order_by(campaigns.c.name))
    return list(rows.scalars())
