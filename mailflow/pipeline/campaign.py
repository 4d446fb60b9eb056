"""A campaign's hooks around the shared pipeline: arms and holdout, preview, approval.

A campaign is a trigger (:func:`mailflow.campaigns.trigger.campaign_trigger`) plus:

- **assignment**: every eligible customer gets an arm or the holdout (deterministic);
- **preview**: the audience, exclusions, arms and rendered sample messages;
- **approval**: nothing is planned before a person approves;
- the holdout is recorded, never planned.

Its audience, plan, send and summary are the pipeline's own (:mod:`.audience`,
:mod:`.plan`, :mod:`.send`, :mod:`.summary`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from mailflow import addresses, ledger
from mailflow.campaigns.assign import HOLDOUT, assign
from mailflow.campaigns.model import Campaign
from mailflow.campaigns.preview import Preview, Sample
from mailflow.campaigns.store import decide_approval, record_assignments, save_campaign
from mailflow.campaigns.trigger import campaign_trigger
from mailflow.campaigns.window import schedule
from mailflow.pipeline import audience as audience_stage
from mailflow.pipeline.message import build_message
from mailflow.pipeline.plan import Plan, plan
from mailflow.pipeline.resources import Resources
from mailflow.pipeline.summary import RunSummary

#: The approval form's answer → the decision recorded.
APPROVED, REJECTED, TIMED_OUT, DRY_RUN, GATE_FAILED = (
    "approved",
    "rejected",
    "timed_out",
    "dry_run",
    "gate_failed",
)


def artifact_key(campaign: str, what: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes only)."""
    return f"campaign-{campaign.replace('_', '-')}-{what}"


@dataclass
class Audience:
    """Who the campaign reaches now: eligible rows with their arm, and what was left out."""

    frame: pd.DataFrame  # eligible and valid, with ``arm`` (holdout included)
    found: int
    excluded: dict[str, int]  # SQL exclusions by reason
    validated: audience_stage.Validated

    @property
    def gate_error(self) -> str | None:
        return self.validated.gate_error

    def arms(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in Counter(self.frame["arm"]).items()}

    def exclusions(self) -> dict[str, int]:
        """SQL exclusions plus every row failing validation (new and earlier)."""
        out = dict(self.excluded)
        if self.validated.all_bad:
            out["quarantined"] = self.validated.all_bad
        return out


def build_audience(
    res: Resources,
    campaign: Campaign,
    now: datetime,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    record: bool,
) -> Audience:
    """Segment → shared exclusions → validation gate → arms.

    With ``record`` the new bad rows are written to ``mf_quarantine`` and the gate judges
    the new ones only; without it (a CLI preview) nothing is written and every bad row
    counts.
    """
    trigger = campaign_trigger(campaign)
    extracted = audience_stage.find(res, trigger, {}, now)
    validated = audience_stage.validate(
        res,
        trigger,
        extracted.frame,
        flow_run_id=flow_run_id,
        max_bad_share=max_bad_share,
        record=record,
    )
    good = validated.frame.reset_index(drop=True)
    arms = assign(campaign, good["customer_id"].tolist())
    good["arm"] = [arms[int(cid)] for cid in good["customer_id"]]
    return Audience(
        frame=good, found=extracted.found, excluded=extracted.excluded, validated=validated
    )


def render_samples(
    res: Resources, campaign: Campaign, frame: pd.DataFrame, *, per_arm: int, now: datetime
) -> list[Sample]:
    """A few messages per variant, rendered exactly as the send stage renders them."""
    if per_arm <= 0 or frame.empty:
        return []
    trigger = campaign_trigger(campaign)
    unsub = res.unsubscribe(trigger)
    picked = (
        frame[frame["arm"] != HOLDOUT]
        .sort_values(["arm", "customer_id"])
        .groupby("arm", sort=False)
        .head(per_arm)
    )
    order = {v.name: i for i, v in enumerate(campaign.variants)}
    picked = picked.iloc[sorted(range(len(picked)), key=lambda i: order[picked["arm"].iloc[i]])]
    with res.engine.connect() as conn:
        contexts = trigger.build_contexts(conn, picked, res.shop())
    samples = []
    for row, ctx in zip(picked.to_dict("records"), contexts, strict=True):
        when = schedule(ctx.get("send_window"), now)
        claimed = ledger.ClaimedMessage(
            id=0,  # not in the ledger: the preview's unsubscribe link points nowhere real
            dedupe_key=str(row["dedupe_key"]),
            email=addresses.normalise(str(row["email"])),
            customer_id=int(row["customer_id"]),
            variant=str(row["arm"]),
            context=ctx,
        )
        msg = build_message(
            claimed, trigger, res.renderer, unsubscribe=unsub, send_at=when.send_at_unix
        )
        samples.append(
            Sample(
                arm=str(row["arm"]),
                customer_id=int(row["customer_id"]),
                email=claimed.email,
                locale=ctx["customer"]["locale"],
                template_variant=ctx.get("template_variant"),
                subject=msg.subject,
                html=msg.html,
                text=msg.text,
                send_at=msg.send_at,
            )
        )
    return samples


def make_preview(
    res: Resources,
    campaign: Campaign,
    audience: Audience,
    *,
    samples_per_variant: int,
    now: datetime,
) -> Preview:
    """The preview a marketer approves: the numbers and the rendered samples."""
    return Preview(
        campaign=campaign.name,
        definition_hash=campaign.definition_hash(),
        found=audience.found,
        excluded=audience.exclusions(),
        eligible=len(audience.frame),
        arms=audience.arms(),
        samples=render_samples(res, campaign, audience.frame, per_arm=samples_per_variant, now=now),
        gate_error=audience.gate_error,
    )


def preview_dir(res: Resources, campaign: str, run: str) -> Path:
    """Where a run's sample files go."""
    return res.settings.campaign_preview_dir / campaign / run


def start_summary(campaign: Campaign, flow_run_id: str | None, preview: Preview) -> RunSummary:
    """The campaign run's summary as the preview left it (a dry run, until decided)."""
    return RunSummary(
        trigger=campaign.trigger,
        flow_run_id=flow_run_id,
        decision=GATE_FAILED if preview.gate_error else DRY_RUN,
        found=preview.found,
        excluded=preview.excluded,
        arms=preview.arms,
        error=preview.gate_error,
    )


def decide(
    res: Resources,
    summary: RunSummary,
    approval_id: int,
    *,
    approve: bool,
    approver: str,
    comment: str,
) -> None:
    """Record the marketer's answer on the summary and in ``mf_campaign_approvals``."""
    summary.decision = APPROVED if approve else REJECTED
    summary.approver, summary.comment = approver, comment
    with res.engine.begin() as conn:
        decide_approval(
            conn, approval_id, decision=summary.decision, approver=approver, comment=comment or None
        )


def time_out(res: Resources, approval_id: int) -> None:
    """Nobody answered in time: the approval request is closed, nothing is sent."""
    with res.engine.begin() as conn:
        decide_approval(conn, approval_id, decision=TIMED_OUT, approver=None, comment=None)


@dataclass
class CampaignPlan:
    """After approval: the audience's numbers and the plan of its variant recipients."""

    audience: Audience
    plan: Plan | None  # None when the gate failed


def plan_campaign(
    res: Resources,
    campaign: Campaign,
    now: datetime,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    batch_size: int,
) -> CampaignPlan:
    """After approval: the audience again (suppressions may have changed), then the ledger.

    The approved definition is stored (the sends use it); every assignment is recorded
    (holdout included, never sent); every variant recipient is planned through the
    pipeline's one plan, keyed ``campaign:<name>:<customer_id>``.
    """
    with res.engine.begin() as conn:
        save_campaign(conn, campaign)
    audience = build_audience(
        res, campaign, now, flow_run_id=flow_run_id, max_bad_share=max_bad_share, record=True
    )
    if audience.gate_error:
        return CampaignPlan(audience=audience, plan=None)
    frame = audience.frame
    with res.engine.begin() as conn:
        record_assignments(
            conn,
            campaign.name,
            {int(c): str(a) for c, a in zip(frame["customer_id"], frame["arm"], strict=True)},
            at=now,
            flow_run_id=flow_run_id,
        )
    planned = plan(
        res,
        campaign_trigger(campaign),
        frame[frame["arm"] != HOLDOUT],
        {},
        flow_run_id=flow_run_id,
        batch_size=batch_size,
    )
    return CampaignPlan(audience=audience, plan=planned)


def take_plan(summary: RunSummary, planned: CampaignPlan) -> None:
    """Put the post-approval audience and plan numbers on the summary."""
    a = planned.audience
    summary.found, summary.excluded, summary.arms = a.found, a.exclusions(), a.arms()
    if planned.plan is not None:
        summary.take_plan(planned.plan)
