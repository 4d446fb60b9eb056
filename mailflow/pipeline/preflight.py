"""Checks before anything is planned, shared by triggers and campaigns.

A missing key, a broken template or a deliverability problem would otherwise turn every
message of the run into a failure, or make things worse; these fail the run first.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from mailflow.guardrail import Deliverability, check, measure
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger


def check_sending(res: Resources, trigger: Trigger) -> None:
    """The keys sending ``trigger`` needs (API key; unsubscribe key for marketing).

    Raises:
        ConfigError: a key is missing or a placeholder (outside demo mode).
    """
    res.settings.api_key()
    res.unsubscribe(trigger)


def check_templates(res: Resources, trigger: Trigger) -> None:
    """Every template file of the trigger compiles (raises ``TemplateError``)."""
    res.renderer.check(trigger.template)


def deliverability(res: Resources, now: datetime) -> Deliverability:
    """Recent bounce and complaint rates; raises ``GuardrailTripped`` when too high."""
    s = res.settings
    with res.engine.connect() as conn:
        d = measure(conn, now=now, window=timedelta(days=s.guardrail_window_days))
    check(
        d,
        max_bounce_rate=s.guardrail_max_bounce_rate,
        max_complaint_rate=s.guardrail_max_complaint_rate,
        min_sent=s.guardrail_min_sent,
    )
    return d
