"""Record stage: the run summary — a warehouse row, a Prefect table artifact, a log line."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from sqlalchemy import func, select

from mailflow.clock import utcnow
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import run_log, send_ledger


@dataclass
class RunSummary:
    """What one run of a trigger did. Counts of messages unless said otherwise."""

    trigger: str
    flow_run_id: str | None
    found: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantined_rows: int = 0
    still_quarantined: int = 0  # quarantined by an earlier run and still bad
    planned: int = 0
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    pending: int = 0  # back to planned after retries ran out; the next run sends them
    error: str | None = None

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def rows(self) -> list[dict[str, Any]]:
        """The summary as (stage, what, count) rows for a table."""
        out: list[dict[str, Any]] = [{"stage": "extract", "what": "found", "count": self.found}]
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
        out.append({"stage": "plan", "what": "planned", "count": self.planned})
        out.append({"stage": "send", "what": "sent", "count": self.sent})
        out += [
            {"stage": "send", "what": f"failed: {k}", "count": v}
            for k, v in sorted(self.failed.items(), key=lambda kv: -kv[1])
        ]
        out.append({"stage": "send", "what": "unknown (not resent)", "count": self.unknown})
        out.append({"stage": "send", "what": "pending (next run)", "count": self.pending})
        return out

    def line(self) -> str:
        """The summary as one log line."""

        def fmt(d: dict[str, int]) -> str:
            return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) + "}"

        return (
            f"{self.trigger}: found={self.found} excluded={fmt(self.excluded)} "
            f"quarantined={fmt(self.quarantined)} planned={self.planned} sent={self.sent} "
            f"failed={self.failed_total} {fmt(self.failed) if self.failed else ''}"
            f"unknown={self.unknown} pending={self.pending}"
        )


def _short(reason: str | None) -> str:
    text = (reason or "no reason recorded").strip().splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def ledger_tally(trigger: str, flow_run_id: str | None) -> dict[str, Any]:
    """This run's ledger rows: counts per status, and failures per reason."""
    cols = send_ledger.c
    run = (cols.trigger == trigger, cols.flow_run_id == flow_run_id)
    with get_engine().connect() as conn:
        statuses: dict[str, int] = dict(
            conn.execute(select(cols.status, func.count()).where(*run).group_by(cols.status)).all()
        )
        failed: Counter[str] = Counter()
        for reason, n in conn.execute(
            select(cols.reason, func.count())
            .where(*run, cols.status == "failed")
            .group_by(cols.reason)
        ):
            failed[_short(reason)] += n
    return {"statuses": statuses, "failed": dict(failed)}


@task(name="record-summary", cache_policy=NONE, persist_result=False)
def record_summary(summary: RunSummary, started_at: datetime) -> RunSummary:
    """Complete the summary from the ledger, then publish it three ways."""
    tally = ledger_tally(summary.trigger, summary.flow_run_id)
    st = tally["statuses"]
    summary.sent = st.get("sent", 0)
    summary.unknown = st.get("unknown", 0)
    summary.pending = st.get("planned", 0) + st.get("sending", 0)
    summary.failed = tally["failed"]
    if summary.error is None and summary.pending:
        summary.error = (
            f"{summary.pending} messages are still pending after every retry; "
            "they stay planned and the next run sends them"
        )
    with get_engine().begin() as conn:
        conn.execute(
            run_log.insert().values(
                flow_run_id=summary.flow_run_id,
                trigger=summary.trigger,
                started_at=started_at,
                finished_at=utcnow(),
                summary=asdict(summary),
            )
        )
    create_table_artifact(
        key=f"{summary.trigger.replace('_', '-')}-summary",
        table=summary.rows(),
        description=(
            f"**{summary.trigger}** — sent {summary.sent}, failed {summary.failed_total}, "
            f"unknown {summary.unknown}, pending {summary.pending}. Per-message detail: "
            "table `mf_send_ledger`; quarantined rows: `mf_quarantine`."
        ),
    )
    get_run_logger().info("summary %s", summary.line())
    return summary
