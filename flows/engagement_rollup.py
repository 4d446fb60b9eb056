"""Flow ``engagement-rollup``: events, sends and orders → the analysts' metric tables."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from pydantic import Field
from sqlalchemy import exists, select

from mailflow.clock import utcnow
from mailflow.metrics import rollup
from mailflow.report import Period, artifact_rows, period_metrics
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import campaigns, send_ledger


@task(name="rollup-engagement", cache_policy=NONE, retries=2, retry_delay_seconds=[10, 60])
def rollup_engagement(full: bool, attribution_hours: float) -> dict[str, Any]:
    """Bring ``mf_message_facts`` and ``mf_metrics_daily`` up to date (idempotent)."""
    result = rollup(get_engine(), full=full, attribution_window=timedelta(hours=attribution_hours))
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
    rows = artifact_rows(period_metrics(get_engine(), period))
    create_table_artifact(
        key="engagement-metrics",
        table=rows or [{"note": "no messages sent in this period"}],
        description=(
            f"Engagement per trigger and variant, messages sent {period.since} – "
            f"{period.until} (UTC). Daily rows: view `mf_engagement_daily`; per message: "
            "`mf_message_facts`."
        ),
    )
    return rows


@task(name="refresh-campaign-results", cache_policy=NONE)
def refresh_campaign_results(days: int) -> list[str]:
    """Experiment results of every campaign that sent in the last ``days`` (they keep moving)."""
    from tasks.campaign import refresh_results

    since = utcnow() - timedelta(days=days)
    with get_engine().connect() as conn:
        names = (
            conn.execute(
                select(campaigns.c.name)
                .where(
                    exists().where(
                        send_ledger.c.trigger == campaigns.c.trigger, send_ledger.c.sent_at >= since
                    )
                )
                .order_by(campaigns.c.name)
            )
            .scalars()
            .all()
        )
    for name in names:
        refresh_results(name)
    return list(names)


@flow(
    name="engagement-rollup",
    description="Roll engagement events, sends and orders up into the metric tables.",
)
def engagement_rollup(
    full: bool = False,
    attribution_hours: Annotated[float, Field(gt=0, le=720)] = 72.0,
    report_days: Annotated[int, Field(ge=1, le=366)] = 7,
    campaign_days: Annotated[int, Field(ge=1, le=90)] = 14,
) -> dict[str, Any]:
    """Update the metric tables incrementally and publish the recent numbers.

    Args:
        full: Rebuild every fact and day instead of only what changed (also picks up
            orders loaded later than the attribution window).
        attribution_hours: An order counts as a conversion of the latest message sent to
            the same customer at most this many hours before it.
        report_days: Send days shown in the `engagement-metrics` artifact.
        campaign_days: Campaigns that sent within this many days get their experiment
            results (`mf_campaign_results` and artifact) recomputed.
    """
    result = rollup_engagement(full, attribution_hours)
    result["metrics"] = publish_metrics(report_days)
    result["campaigns"] = refresh_campaign_results(campaign_days)
    return result
