"""Pre-flight checks, before anything is planned: warehouse, keys, templates, deliverability."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.campaigns.model import Campaign
from mailflow.campaigns.trigger import campaign_trigger, resolve_trigger
from mailflow.pipeline import preflight, resources


@task(name="preflight", cache_policy=NONE, persist_result=False)
def check_before_sending(
    trigger_name: str, now: datetime, override_guardrail: bool, campaign: Campaign | None = None
) -> None:
    """Warehouse reachable and migrated, keys present, templates compile, bounce and
    complaint rates below their limits.

    ``campaign``: the campaign being sent (it may not be stored yet).
    Raises ``ConfigError``, ``TemplateError`` or ``GuardrailTripped`` (nothing planned).
    """
    res = resources.current()
    trigger = campaign_trigger(campaign) if campaign else resolve_trigger(trigger_name)
    logger = get_run_logger()
    preflight.check_warehouse(res)
    preflight.check_sending(res, trigger)
    if override_guardrail:
        logger.warning("deliverability guardrail overridden for this run")
    else:
        s = res.settings
        d = preflight.deliverability(res, now)
        logger.info(
            "deliverability over %g days: %d sent, bounce rate %.2f%%, complaint rate %.3f%%",
            s.guardrail_window_days,
            d.sent,
            100 * d.bounce_rate,
            100 * d.complaint_rate,
        )
    preflight.check_templates(res, trigger)
