"""Campaign results as Prefect tasks: the experiment table, stored and published.

The numbers come from :mod:`mailflow.campaigns.stats`; conversions keep moving for 72 h
after a send, so the rollup flow refreshes every recent campaign's table.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from mailflow.campaigns.model import Campaign
from mailflow.campaigns.stats import display_rows, experiment_table, split_check
from mailflow.campaigns.store import recently_sent_campaigns
from mailflow.clock import utcnow
from mailflow.pipeline import resources
from mailflow.pipeline.campaign import artifact_key


def refresh_results(name: str, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Recompute a campaign's experiment table and split check, store them, and publish
    them as an artifact (the split check, flagged on a sample-ratio mismatch, leads)."""
    engine = resources.current().engine
    rows = experiment_table(engine, name, variants=variants)
    check = split_check(engine, name)
    if rows:
        control = variants[0] if variants else rows[0].get("control_arm") or rows[0]["arm"]
        split = "" if check is None else f"**{check.summary()}** (table `mf_campaign_split`). "
        create_table_artifact(
            key=artifact_key(name, "results"),
            table=display_rows(rows),
            description=f"{split}Experiment results of campaign {name} (control: {control}); "
            "table `mf_campaign_results`, definitions in docs/metrics.md (contract v2). "
            "itt_conversion counts orders within 72 h of the send (intention to treat), so "
            "it grows until then; the engagement-rollup flow refreshes this table.",
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
