"""Metrics stage: the rollup into the analysts' tables, and what is published from them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from mailflow.campaigns.model import Campaign
from mailflow.campaigns.stats import display_rows, experiment_table
from mailflow.campaigns.store import recently_sent_campaigns
from mailflow.clock import utcnow
from mailflow.metrics import rollup
from mailflow.pipeline import resources
from mailflow.pipeline.campaign import artifact_key
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
            f"{period.until} (UTC). Daily rows: view `mf_engagement_daily`; per message: "
            "`mf_message_facts`."
        ),
    )
    return rows


def refresh_results(name: str, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Recompute a campaign's experiment table, store it, and publish it as an artifact."""
    rows = experiment_table(resources.current().engine, name, variants=variants)
    if rows:
        control = variants[0] if variants else rows[0].get("control_arm") or rows[0]["arm"]
        create_table_artifact(
            key=artifact_key(name, "results"),
            table=display_rows(rows),
            description=f"Experiment results of campaign {name} (control: {control}); table "
            "`mf_campaign_results`. Conversions count orders within 72 h, so they grow until "
            "then; the engagement-rollup flow refreshes this table.",
        )
    return rows


@task(name="campaign-results", cache_policy=NONE, persist_result=False)
def publish_results(campaign: Campaign) -> list[dict[str, Any]]:
    """The experiment table, stored in ``mf_campaign_results`` and published as an artifact."""
    return refresh_results(campaign.name, [v.name for v in campaign.variants])


@task(name="refresh-campaign-results", cache_policy=NONE)
def refresh_campaign_results(days: int) -> list[str]:
    """Experiment results of every campaign that sent in the last ``days`` (they keep moving)."""
    with resources.current().engine.connect() as conn:
        names = recently_sent_campaigns(conn, since=utcnow() - timedelta(days=days))
    for name in names:
        refresh_results(name)
    return names
