"""Flow ``engagement-rollup``: events, sends and orders → the analysts' metric tables."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from tasks.metrics import publish_metrics, rollup_engagement
from tasks.reconcile import reconcile_sends
from tasks.results import refresh_campaign_results


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
    """Reconcile ambiguous sends, update the metric tables incrementally, publish.

    Args:
        full: Rebuild every fact and day instead of only what changed (also picks up
            orders loaded later than the attribution window).
        attribution_hours: An order counts as a last-touch conversion
            (`conversions_last_touch`) of the latest message sent to the same customer at
            most this many hours before it (docs/metrics.md).
        report_days: Send days shown in the `engagement-metrics` artifact.
        campaign_days: Campaigns that sent within this many days get their experiment
            results (`mf_campaign_results` and artifact) recomputed.
    """
    reconciled = reconcile_sends(flow_run.get_id())
    result = rollup_engagement(full, attribution_hours)
    result["reconciled"] = reconciled
    result["metrics"] = publish_metrics(report_days)
    result["campaigns"] = refresh_campaign_results(campaign_days)
    return result
