"""Flow ``campaign``: a marketer's segmented batch send, with preview, approval and A/B arms.

audience (segment) → exclusions and validation gate → arms and holdout → preview
(artifact and sample files) → pause for approval → plan in the ledger → send batches →
summary and experiment results. ``dry_run`` stops after the preview; a rejected or
timed-out approval sends nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger, pause_flow_run
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from flows.pipeline import send_planned
from mailflow.campaigns.model import SendWindow, TemplateVariant, Variant, parse_campaign
from mailflow.campaigns.preview import preview_markdown
from mailflow.campaigns.segments import Condition, Group, Segment
from mailflow.clock import utcnow
from mailflow.errors import DataQualityError, MailflowError, TransientError
from mailflow.pipeline import campaign as stages
from mailflow.pipeline import resources
from mailflow.pipeline.options import BATCH_SIZE, MAX_BAD_SHARE, BatchSize, MaxBadShare
from mailflow.pipeline.summary import RunSummary
from mailflow.runners import configured_task_runner
from mailflow.settings import get_settings
from tasks.campaign import plan_campaign, preview_campaign, request_approval
from tasks.preflight import check_before_sending
from tasks.record import record_summary
from tasks.results import publish_results

# Prefect builds the parameter model from this module's names: the recursive segment
# types must be resolvable here.
__all__ = ["Approval", "Condition", "Group", "campaign"]


class Approval(RunInput):
    """The approval form shown in the Prefect UI when the campaign pauses."""

    approve: bool = Field(
        default=False, description="Tick to send the campaign as previewed; untick to reject."
    )
    approver: str = Field(
        min_length=1, max_length=200, description="Your name or email (recorded with the decision)."
    )
    comment: str = Field(default="", max_length=2000, description="Why (recorded).")


@flow(
    name="campaign",
    description="A marketer's segmented send: preview, approval, A/B subjects, holdout.",
    task_runner=configured_task_runner(),
)
def campaign(
    name: Annotated[str, Field(description="Campaign name (lower case, digits, _ and -).")],
    segment: Segment,
    template: Annotated[str, Field(description="Template folder under templates/.")],
    variants: Annotated[list[Variant], Field(min_length=1, max_length=10)],
    holdout_share: Annotated[float, Field(ge=0, le=0.5)] = 0.0,
    send_window: SendWindow | None = None,
    default_locale: str = "en",
    unknown_locale: Literal["fallback", "quarantine"] = "fallback",
    kind: Literal["marketing", "transactional"] = "marketing",
    template_variants: list[TemplateVariant] | None = None,
    description: str = "",
    dry_run: bool = False,
    samples_per_variant: Annotated[int, Field(ge=0, le=20)] = 3,
    approval_timeout_s: Annotated[int, Field(ge=1, le=7 * 86400)] = 86400,
    batch_size: BatchSize = BATCH_SIZE,
    max_bad_share: MaxBadShare = MAX_BAD_SHARE,
    override_guardrail: bool = False,
) -> RunSummary:
    """Preview the campaign, wait for approval, then send it through the ledger.

    Args:
        name: Campaign name; messages are keyed ``campaign:<name>:<customer_id>``.
        segment: Who it is for: filters combined with all/any/not (see the README).
        template: Template folder; subject.txt typically prints ``{{ campaign.subject }}``.
        variants: Arms with subject lines per locale and shares (the first is control).
        holdout_share: Share of the eligible audience held out: recorded, never sent.
        send_window: Local hours (and weekdays) in which messages may arrive.
        default_locale: Locale for customers whose language has no template folder.
        unknown_locale: ``fallback`` to the default locale, or ``quarantine`` the row.
        kind: ``marketing`` (consent, unsubscribe, frequency cap) or ``transactional``.
        template_variants: Per-segment template variant files (first match wins).
        description: Free text shown in the preview.
        dry_run: Stop after the preview; nothing is planned or sent.
        samples_per_variant: Rendered sample messages per variant in the preview.
        approval_timeout_s: Seconds to wait for approval; then nothing is sent.
        batch_size: Messages per send task.
        max_bad_share: Fail the run when more than this share of new rows is bad.
        override_guardrail: Send even though recent bounce or complaint rates are too high.
    """
    logger = get_run_logger()
    started = utcnow()
    run_id = flow_run.get_id()
    spec = parse_campaign(
        {
            "name": name,
            "description": description,
            "kind": kind,
            "template": template,
            "segment": segment,
            "variants": variants,
            "holdout_share": holdout_share,
            "send_window": send_window,
            "default_locale": default_locale,
            "unknown_locale": unknown_locale,
            "template_variants": template_variants or [],
        },
        source="parameters",
    )
    settings = get_settings()
    if not dry_run:
        # Fail fast, before the preview: a missing key would only show after approval.
        settings.api_key()

    preview = preview_campaign(spec, started, run_id, max_bad_share, samples_per_variant)
    summary = stages.start_summary(spec, run_id, preview)
    if preview.gate_error:
        record_summary(summary, started)
        raise DataQualityError(preview.gate_error)
    if dry_run:
        return record_summary(summary, started)

    approval_id = request_approval(spec, run_id, preview)
    form = Approval.with_initial_data(description=preview_markdown(spec, preview), approve=False)
    try:
        answer = pause_flow_run(
            wait_for_input=form,
            timeout=approval_timeout_s,
            poll_interval=settings.campaign_approval_poll_s,
            key=f"approval-{approval_id}",
        )
    except FlowPauseTimeout:
        stages.time_out(resources.current(), approval_id)
        logger.error(
            "campaign %s: no approval within %d s; nothing was sent", spec.name, approval_timeout_s
        )
        raise
    stages.decide(
        resources.current(),
        summary,
        approval_id,
        approve=answer.approve,
        approver=answer.approver,
        comment=answer.comment,
    )
    logger.info("campaign %s %s by %s", spec.name, summary.decision, answer.approver)
    if not answer.approve:
        return record_summary(summary, started)

    check_before_sending(spec.trigger, utcnow(), override_guardrail, spec)
    planned = plan_campaign(spec, utcnow(), run_id, max_bad_share, batch_size)
    stages.take_plan(summary, planned)
    error: MailflowError | None = None
    if planned.plan is None:
        error = DataQualityError(str(planned.audience.gate_error))
    else:
        error = send_planned(spec.trigger, planned.plan.batches, run_id)
    if error is not None:
        summary.error = str(error)
    summary = record_summary(summary, started)
    publish_results(spec)
    if summary.error is None and summary.deferred:
        logger.warning(
            "campaign %s: %d messages wait for their send window; run the campaign again "
            "later to send them",
            spec.name,
            summary.deferred,
        )
    if error is not None:
        raise error
    if summary.error is not None:
        raise TransientError(summary.error)
    return summary
