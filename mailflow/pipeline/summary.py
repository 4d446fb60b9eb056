"""What one run did: one summary for triggers and campaigns, completed from the ledger.

The counts of messages (sent, failed, unknown, pending) are read from the ledger rows
this run planned or claimed (:func:`mailflow.ledger.tally`), so they mean the same for
every flow. A campaign adds its approval decision and its arms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from mailflow import ledger
from mailflow.clock import utcnow
from mailflow.pipeline.audience import Validated
from mailflow.pipeline.plan import Plan
from mailflow.pipeline.resources import Resources
from mailflow.warehouse.schema import run_log


@dataclass
class RunSummary:
    """What one run of a trigger or campaign did. Counts of messages unless said otherwise."""

    trigger: str
    flow_run_id: str | None
    found: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantined_rows: int = 0
    still_quarantined: int = 0  # quarantined by an earlier run and still bad
    planned: int = 0  # messages this run set out to send
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    pending: int = 0  # this run's rows not settled: back to planned, a later run sends them
    deferred: int = 0  # of those, waiting for the recipient's send window (not an error)
    # Ambiguous sends resolved and stale rows settled before sending, by decision
    # (mailflow/pipeline/reconcile.py), and what is still unresolved (every run's rows).
    reconciled: dict[str, int] = field(default_factory=dict)
    unresolved: int = 0
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    # A campaign's: its approval (dry_run | approved | rejected | timed_out | gate_failed)
    # and how many recipients each arm (holdout included) has.
    decision: str | None = None
    approver: str | None = None
    comment: str | None = None
    arms: dict[str, int] = field(default_factory=dict)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def campaign(self) -> str | None:
        """The campaign's name, for a campaign run."""
        return self.trigger.removeprefix("campaign:") if self.decision is not None else None

    def audience(self, found: int, excluded: dict[str, int], validated: Validated) -> None:
        """Take the audience's numbers (extraction and validation)."""
        self.found, self.excluded = found, excluded
        self.quarantined, self.quarantined_rows = validated.quarantined, validated.bad_rows
        self.still_quarantined = validated.still_quarantined

    def rows(self) -> list[dict[str, Any]]:
        """The summary as (stage, what, count) rows for a table."""
        out: list[dict[str, Any]] = []
        if self.decision is not None:
            out.append({"stage": "approval", "what": self.decision, "count": 1})
        out.append({"stage": "extract", "what": "found", "count": self.found})
        out += [
            {"stage": "extract", "what": f"excluded: {k}", "count": v}
            for k, v in sorted(self.excluded.items())
        ]
        out += [
            {"stage": "validate", "what": f"quarantined: {k}", "count": v}
            for k, v in sorted(self.quarantined.items())
        ]
        if self.still_quarantined:
            out.append(
                {
                    "stage": "validate",
                    "what": "still quarantined (earlier run)",
                    "count": self.still_quarantined,
                }
            )
        out += [
            {"stage": "assign", "what": f"arm: {k}", "count": v}
            for k, v in sorted(self.arms.items())
        ]
        out.append({"stage": "plan", "what": "planned", "count": self.planned})
        out.append({"stage": "send", "what": "sent", "count": self.sent})
        out += [
            {"stage": "send", "what": f"failed: {k}", "count": v}
            for k, v in sorted(self.failed.items(), key=lambda kv: -kv[1])
        ]
        out.append({"stage": "send", "what": "unknown (awaiting events)", "count": self.unknown})
        out.append({"stage": "send", "what": "pending (next run)", "count": self.pending})
        out += [
            {"stage": "reconcile", "what": k, "count": v}
            for k, v in sorted(self.reconciled.items())
        ]
        if self.unresolved:
            out.append(
                {"stage": "reconcile", "what": "still unknown (all runs)", "count": self.unresolved}
            )
        out += [{"stage": "note", "what": n, "count": 0} for n in self.notes]
        return out

    def take_plan(self, plan: Plan) -> None:
        """Take what planning found: the messages to send, and what reconciliation did."""
        self.planned = plan.planned
        self.reconciled = plan.reconciled.counts()
        self.unresolved = plan.reconciled.unresolved
        if plan.reconciled.note:
            self.notes.append(plan.reconciled.note)

    def line(self) -> str:
        """The summary as one log line."""

        def fmt(d: dict[str, int]) -> str:
            return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) + "}"

        decision = f"decision={self.decision} arms={fmt(self.arms)} " if self.decision else ""
        return (
            f"{self.trigger}: {decision}found={self.found} excluded={fmt(self.excluded)} "
            f"quarantined={fmt(self.quarantined)} planned={self.planned} sent={self.sent} "
            f"failed={self.failed_total} {fmt(self.failed) if self.failed else ''}"
            f"unknown={self.unknown} pending={self.pending}"
            + (f" reconciled={fmt(self.reconciled)}" if self.reconciled else "")
            + (f" still_unknown={self.unresolved}" if self.unresolved else "")
            + "".join(f" note: {n}" for n in self.notes)
        )

    def description(self) -> str:
        """One Markdown line for the run's artifact."""
        what = f"**{self.trigger}**" + (f" — {self.decision};" if self.decision else " —")
        return (
            f"{what} sent {self.sent}, failed {self.failed_total}, unknown {self.unknown}, "
            f"pending {self.pending}. Per-message detail: table `mf_send_ledger`; quarantined "
            "rows: `mf_quarantine`"
            + ("; arms: `mf_campaign_assignments`." if self.decision else ".")
        )


def complete(res: Resources, summary: RunSummary, started_at: datetime) -> RunSummary:
    """Fill the message counts from the ledger and store the summary in ``mf_runs``.

    A run that leaves messages pending (other than those waiting for their send window)
    without an error of its own gets one: they stay planned and the next run sends them.
    """
    with res.engine.connect() as conn:
        t = ledger.tally(conn, summary.trigger, summary.flow_run_id)
    summary.sent = t.statuses.get(ledger.Status.SENT, 0)
    summary.unknown = t.statuses.get(ledger.Status.UNKNOWN, 0)
    summary.pending = t.pending
    summary.failed = t.failed
    summary.deferred = t.deferred
    if summary.error is None and summary.pending > summary.deferred:
        summary.error = (
            f"{summary.pending} messages are still pending after every retry; "
            "they stay planned and the next run sends them"
        )
    with res.engine.begin() as conn:
        conn.execute(
            run_log.insert().values(
                flow_run_id=summary.flow_run_id,
                trigger=summary.trigger,
                started_at=started_at,
                finished_at=utcnow(),
                summary=asdict(summary),
            )
        )
    return summary
