"""Campaign stages as Prefect tasks: preview, approval request, plan.

The work is in :mod:`mailflow.pipeline.campaign` (and the shared stages it calls); these
wrappers add the artifacts and the run's log lines.
"""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from mailflow.campaigns.assign import HOLDOUT
from mailflow.campaigns.model import Campaign
from mailflow.campaigns.preview import Preview, preview_markdown, write_samples
from mailflow.campaigns.store import open_approval
from mailflow.pipeline import campaign as stages
from mailflow.pipeline import resources
from tasks.plan import log_plan


@task(name="campaign-preview", cache_policy=NONE, persist_result=False)
def preview_campaign(
    campaign: Campaign,
    now: datetime,
    flow_run_id: str | None,
    max_bad_share: float,
    samples_per_variant: int,
) -> Preview:
    """Audience, exclusions by reason, arms and rendered samples; a Markdown artifact."""
    res = resources.current()
    res.renderer.check(campaign.template)
    audience = stages.build_audience(
        res, campaign, now, flow_run_id=flow_run_id, max_bad_share=max_bad_share, record=True
    )
    preview = stages.make_preview(
        res, campaign, audience, samples_per_variant=samples_per_variant, now=now
    )
    write_samples(preview.samples, stages.preview_dir(res, campaign.name, flow_run_id or "local"))
    create_markdown_artifact(
        key=stages.artifact_key(campaign.name, "preview"),
        markdown=preview_markdown(campaign, preview),
        description=f"Preview of campaign {campaign.name}: audience, exclusions, samples.",
    )
    get_run_logger().info(preview.line())
    return preview


@task(name="campaign-approval-request", cache_policy=NONE, persist_result=False)
def request_approval(campaign: Campaign, flow_run_id: str | None, preview: Preview) -> int:
    """A ``pending`` row in ``mf_campaign_approvals`` with the numbers shown."""
    with resources.current().engine.begin() as conn:
        return open_approval(conn, campaign, flow_run_id=flow_run_id, preview=preview.counts())


@task(name="campaign-plan", cache_policy=NONE, persist_result=False)
def plan_campaign(
    campaign: Campaign,
    now: datetime,
    flow_run_id: str | None,
    max_bad_share: float,
    batch_size: int,
) -> stages.CampaignPlan:
    """After approval: the audience again, assignments, the ledger (see the core)."""
    res = resources.current()
    result = stages.plan_campaign(
        res,
        campaign,
        now,
        flow_run_id=flow_run_id,
        max_bad_share=max_bad_share,
        batch_size=batch_size,
    )
    if result.plan is not None:
        log_plan(campaign.trigger, result.plan, batch_size)
        get_run_logger().info(
            "%s: %d held out", campaign.trigger, result.audience.arms().get(HOLDOUT, 0)
        )
    return result
