"""Campaign stages: audience, preview, approval record, plan, summary, results.

The campaign runs through the shared pipeline: its audience is the shared extraction
(exclusions in SQL, counted by reason, frequency cap included) over the segment, then
the same validation gate and quarantine, then the ledger, then the same send batches
(``tasks.send.send_batch``). The plain functions here are also what
``mailflow campaign preview`` calls, without Prefect.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from mailflow import ledger
from mailflow.campaigns.assign import HOLDOUT, assign
from mailflow.campaigns.model import Campaign
from mailflow.campaigns.preview import Preview, Sample, preview_markdown, write_samples
from mailflow.campaigns.stats import display_rows, experiment_table
from mailflow.campaigns.store import (
    decide_approval,
    open_approval,
    record_assignments,
    save_campaign,
)
from mailflow.campaigns.trigger import campaign_trigger
from mailflow.campaigns.window import schedule
from mailflow.clock import utcnow
from mailflow.errors import DataQualityError
from mailflow.extract import extract
from mailflow.settings import get_settings
from mailflow.validation import check_gate, validate_frame
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import run_log
from tasks.plan import shop_defaults
from tasks.record import ledger_tally
from tasks.send import build_message, get_renderer, unsubscribe_settings

# The validate stage's helpers: the campaign writes quarantine rows exactly as it does.
from tasks.validate import quarantine_new

_CHUNK = 5_000


def artifact_key(campaign: str, what: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes only)."""
    return f"campaign-{campaign.replace('_', '-')}-{what}"


@dataclass
class Audience:
    """Who the campaign reaches now: eligible rows with their arm, and what was left out."""

    frame: pd.DataFrame  # eligible and valid, with ``arm`` (holdout included)
    found: int
    excluded: dict[str, int]  # SQL exclusions by reason
    quarantined: dict[str, int] = field(default_factory=dict)  # new bad rows by rule
    bad_rows: int = 0  # rows failing validation (new and earlier)
    gate_error: str | None = None

    def arms(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in Counter(self.frame["arm"]).items()}

    def exclusions(self) -> dict[str, int]:
        out = dict(self.excluded)
        if self.bad_rows:
            out["quarantined"] = self.bad_rows
        return out


def build_audience(
    campaign: Campaign,
    now: datetime,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    record: bool,
) -> Audience:
    """Segment → shared exclusions → validation gate → arms.

    With ``record`` the new bad rows are written to ``mf_quarantine`` (as the validate
    stage does) and the gate judges the new ones only; without it (a CLI preview) nothing
    is written and every bad row counts.
    """
    trigger = campaign_trigger(campaign)
    engine = get_engine()
    with engine.connect() as conn:
        extracted = extract(conn, trigger, now=now, params={})
    outcome = validate_frame(extracted.frame, trigger.suite, key_column="dedupe_key")
    judged = outcome
    if record:
        judged, _ = quarantine_new(trigger.name, extracted.frame, outcome, flow_run_id)
    gate_error = None
    try:
        check_gate(judged, max_bad_share=max_bad_share)
    except DataQualityError as exc:
        gate_error = str(exc)
    good = outcome.good.reset_index(drop=True)
    arms = assign(campaign, good["customer_id"].tolist())
    good["arm"] = [arms[int(cid)] for cid in good["customer_id"]]
    return Audience(
        frame=good,
        found=extracted.found,
        excluded=extracted.excluded,
        quarantined={k: v for k, v in judged.counts.items() if v},
        bad_rows=outcome.bad_rows,
        gate_error=gate_error,
    )


def render_samples(
    campaign: Campaign, frame: pd.DataFrame, *, per_arm: int, now: datetime
) -> list[Sample]:
    """A few messages per variant, rendered exactly as the send stage renders them."""
    if per_arm <= 0 or frame.empty:
        return []
    trigger = campaign_trigger(campaign)
    renderer = get_renderer()
    unsub = unsubscribe_settings(trigger)
    picked = (
        frame[frame["arm"] != HOLDOUT]
        .sort_values(["arm", "customer_id"])
        .groupby("arm", sort=False)
        .head(per_arm)
    )
    order = {v.name: i for i, v in enumerate(campaign.variants)}
    picked = picked.iloc[sorted(range(len(picked)), key=lambda i: order[picked["arm"].iloc[i]])]
    with get_engine().connect() as conn:
        contexts = trigger.build_contexts(conn, picked, shop_defaults())
    samples = []
    for row, ctx in zip(picked.to_dict("records"), contexts, strict=True):
        when = schedule(ctx.get("send_window"), now)
        claimed = ledger.ClaimedMessage(
            id=0,  # not in the ledger: the preview's unsubscribe link points nowhere real
            dedupe_key=str(row["dedupe_key"]),
            email=str(row["email"]).strip().lower(),
            customer_id=int(row["customer_id"]),
            variant=str(row["arm"]),
            context=ctx,
        )
        msg = build_message(
            claimed, trigger, renderer, unsubscribe=unsub, send_at=when.send_at_unix
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
    campaign: Campaign, audience: Audience, *, samples_per_variant: int, now: datetime
) -> Preview:
    return Preview(
        campaign=campaign.name,
        definition_hash=campaign.definition_hash(),
        found=audience.found,
        excluded=audience.exclusions(),
        eligible=len(audience.frame),
        arms=audience.arms(),
        samples=render_samples(campaign, audience.frame, per_arm=samples_per_variant, now=now),
        gate_error=audience.gate_error,
    )


def preview_dir(campaign: str, run: str) -> Path:
    return get_settings().campaign_preview_dir / campaign / run


# -- tasks --------------------------------------------------------------------------------


@task(name="campaign-preview", cache_policy=NONE, persist_result=False)
def preview_campaign(
    campaign: Campaign,
    now: datetime,
    flow_run_id: str | None,
    max_bad_share: float,
    samples_per_variant: int,
) -> Preview:
    """Audience, exclusions by reason, arms and rendered samples; a Markdown artifact."""
    get_renderer().check(campaign.template)
    audience = build_audience(
        campaign, now, flow_run_id=flow_run_id, max_bad_share=max_bad_share, record=True
    )
    preview = make_preview(campaign, audience, samples_per_variant=samples_per_variant, now=now)
    write_samples(preview.samples, preview_dir(campaign.name, flow_run_id or "local"))
    create_markdown_artifact(
        key=artifact_key(campaign.name, "preview"),
        markdown=preview_markdown(campaign, preview),
        description=f"Preview of campaign {campaign.name}: audience, exclusions, samples.",
    )
    get_run_logger().info(
        "campaign %s: %d match, excluded %s, arms %s",
        campaign.name,
        preview.found,
        preview.excluded or "none",
        preview.arms,
    )
    return preview


@task(name="campaign-approval-request", cache_policy=NONE, persist_result=False)
def request_approval(campaign: Campaign, flow_run_id: str | None, preview: Preview) -> int:
    """A ``pending`` row in ``mf_campaign_approvals`` with the numbers shown."""
    with get_engine().begin() as conn:
        return open_approval(conn, campaign, flow_run_id=flow_run_id, preview=preview.counts())


def record_decision(
    approval_id: int, *, decision: str, approver: str | None, comment: str | None
) -> None:
    """Who decided what, and when (a plain function: it also runs while the run is paused)."""
    with get_engine().begin() as conn:
        decide_approval(
            conn, approval_id, decision=decision, approver=approver, comment=comment or None
        )


@dataclass
class CampaignPlan:
    """What the plan stage did: batches of ledger ids to send, and the audience's numbers."""

    batches: list[list[int]]
    found: int
    excluded: dict[str, int]
    quarantined: dict[str, int]
    arms: dict[str, int]
    planned: int
    gate_error: str | None = None


@task(name="campaign-plan", cache_policy=NONE, persist_result=False)
def plan_campaign(
    campaign: Campaign,
    now: datetime,
    flow_run_id: str | None,
    max_bad_share: float,
    batch_size: int,
) -> CampaignPlan:
    """After approval: the audience again (suppressions may have changed), then the ledger.

    Every assignment is recorded (holdout included, never sent); every variant recipient
    gets a ``planned`` ledger row keyed ``campaign:<name>:<customer_id>``.
    """
    logger = get_run_logger()
    engine = get_engine()
    with engine.begin() as conn:
        save_campaign(conn, campaign)  # the approved definition is the one the sends use
    audience = build_audience(
        campaign, now, flow_run_id=flow_run_id, max_bad_share=max_bad_share, record=True
    )
    plan = CampaignPlan(
        batches=[],
        found=audience.found,
        excluded=audience.exclusions(),
        quarantined=audience.quarantined,
        arms=audience.arms(),
        planned=0,
        gate_error=audience.gate_error,
    )
    if audience.gate_error:
        return plan
    trigger = campaign_trigger(campaign)
    frame = audience.frame
    with engine.begin() as conn:
        expired = ledger.expire_stale_claims(conn, trigger.name)
        record_assignments(
            conn,
            campaign.name,
            {int(c): str(a) for c, a in zip(frame["customer_id"], frame["arm"], strict=True)},
            at=now,
            flow_run_id=flow_run_id,
        )
    if expired:
        logger.warning(
            "%s: %d messages left mid-send by a stopped run: unknown", trigger.name, expired
        )
    sendable = frame[frame["arm"] != HOLDOUT]
    shop = shop_defaults()
    for start in range(0, len(sendable), _CHUNK):
        part = sendable.iloc[start : start + _CHUNK]
        with engine.begin() as conn:
            contexts = trigger.build_contexts(conn, part, shop)
            plan.planned += ledger.plan(
                conn,
                trigger.name,
                (
                    ledger.PlannedMessage(
                        dedupe_key=row["dedupe_key"],
                        email=str(row["email"]).strip().lower(),
                        customer_id=int(row["customer_id"]),
                        variant=str(row["arm"]),
                        context=ctx,
                    )
                    for row, ctx in zip(part.to_dict("records"), contexts, strict=True)
                ),
                flow_run_id=flow_run_id,
            )
    with engine.connect() as conn:
        ids = ledger.planned_ids(conn, trigger.name)
    plan.batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    logger.info(
        "%s: %d planned (%d held out), %d to send in %d batches",
        trigger.name,
        plan.planned,
        plan.arms.get(HOLDOUT, 0),
        len(ids),
        len(plan.batches),
    )
    return plan


@dataclass
class CampaignSummary:
    """What one campaign run did."""

    campaign: str
    flow_run_id: str | None
    decision: str  # dry_run | approved | rejected | timed_out | gate_failed
    approver: str | None = None
    comment: str | None = None
    found: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    arms: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unknown: int = 0
    pending: int = 0  # planned rows not sent yet (deferred past 72 h, or retries ran out)
    error: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"stage": "approval", "what": self.decision, "count": 1},
            {"stage": "audience", "what": "segment matches", "count": self.found},
        ]
        out += [
            {"stage": "audience", "what": f"excluded: {k}", "count": v}
            for k, v in sorted(self.excluded.items())
        ]
        out += [
            {"stage": "assign", "what": f"arm: {k}", "count": v}
            for k, v in sorted(self.arms.items())
        ]
        out += [
            {"stage": "plan", "what": "planned", "count": self.planned},
            {"stage": "send", "what": "sent", "count": self.sent},
        ]
        out += [
            {"stage": "send", "what": f"failed: {k}", "count": v} for k, v in self.failed.items()
        ]
        out += [
            {"stage": "send", "what": "unknown (not resent)", "count": self.unknown},
            {"stage": "send", "what": "pending (a later run)", "count": self.pending},
        ]
        return out


@task(name="campaign-summary", cache_policy=NONE, persist_result=False)
def record_campaign_summary(summary: CampaignSummary, started_at: datetime) -> CampaignSummary:
    """Complete the summary from the ledger; a row in ``mf_runs``, an artifact, a log line."""
    trigger = f"campaign:{summary.campaign}"
    if summary.decision == "approved":
        tally = ledger_tally(trigger, summary.flow_run_id)
        st = tally["statuses"]
        summary.sent = st.get("sent", 0)
        summary.unknown = st.get("unknown", 0)
        summary.failed = tally["failed"]
        with get_engine().connect() as conn:
            summary.pending = len(ledger.planned_ids(conn, trigger))
    with get_engine().begin() as conn:
        conn.execute(
            run_log.insert().values(
                flow_run_id=summary.flow_run_id,
                trigger=trigger,
                started_at=started_at,
                finished_at=utcnow(),
                summary=asdict(summary),
            )
        )
    create_table_artifact(
        key=artifact_key(summary.campaign, "summary"),
        table=summary.rows(),
        description=f"**campaign {summary.campaign}** — {summary.decision}; sent "
        f"{summary.sent}, pending {summary.pending}. Ledger: `mf_send_ledger` (trigger "
        f"`{trigger}`); arms: `mf_campaign_assignments`.",
    )
    get_run_logger().info(
        "campaign %s: %s, sent=%d pending=%d unknown=%d failed=%d",
        summary.campaign,
        summary.decision,
        summary.sent,
        summary.pending,
        summary.unknown,
        sum(summary.failed.values()),
    )
    return summary


def refresh_results(name: str, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Recompute a campaign's experiment table, store it, and publish it as an artifact."""
    rows = experiment_table(get_engine(), name, variants=variants)
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


__all__ = [
    "Audience",
    "CampaignPlan",
    "CampaignSummary",
    "artifact_key",
    "refresh_results",
    "build_audience",
    "make_preview",
    "plan_campaign",
    "preview_campaign",
    "publish_results",
    "record_campaign_summary",
    "record_decision",
    "render_samples",
    "request_approval",
]
