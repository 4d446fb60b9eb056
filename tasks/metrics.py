"""Metrics stage: the rollup into the analysts' tables, and the engagement artifact."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from mailflow.clock import utcnow
from mailflow.metrics import rollup
from mailflow.pipeline import resources
from mailflow.report import Period, artifact_rows, period_metrics


@task(name="rollup-engagement", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60])
def rollup_engagement(full: bool, attribution_hours: float) -> dict[str, Any]:
    """Bring ``mf_message_facts`` and ``mf_metrics_daily`` up to date (idempotent)."""
    result = rollup(
        resources.current().engine,
        full=full,
        attribution_window=timedelta(hours=attribution_hours),
    )
    get_run_logger().info(
        "rollup (%s): %d customers, %d messages, %d send days recomputed in %.1fs; "
        "events up to id %d",
        "full" if result.full else "incremental",
        result.customers,
        result.messages,
        len(result.days),
        result.seconds,
        result.last_event_id,
    )
    return {
        "full": result.full,
        "customers": result.customers,
        "messages": result.messages,
        "days": [d.isoformat() for d in result.days],
        "last_event_id": result.last_event_id,
        "seconds": round(result.seconds, 3),
    }


@task(name="publish-metrics", cache_policy=NONE)
def publish_metrics(report_days: int) -> list[dict[str, Any]]:
    """The last ``report_days`` send days per trigger and variant, as a table artifact."""
    today = utcnow().date()
    period = Period(today - timedelta(days=report_days - 1), today)
    rows = artifact_rows(period_metrics(resources.current().engine, period))
    create_table_artifact(
        key="engagement-metrics",
        table=rows or [{"note": "no messages sent in this period"}],
        description=(
            f"Engagement per trigger and variant, messages sent {period.since} – "
            f"{period.until} (UTC). Definitions: docs/metrics.md (metrics contract v2): opens "
            "are human (machine opens apart), open/click rates are of delivered, "
            "conversion_rate_last_touch of sent. Daily rows: view `mf_engagement_daily`; per "
            "message: `mf_message_facts`."
        ),
    )
    return rows
