"""Checks before anything is planned, shared by triggers and campaigns.

A missing key, a broken template or a deliverability problem would otherwise turn every
message of the run into a failure, or make things worse; these fail the run first.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from mailflow.errors import ConfigError
from mailflow.guardrail import Deliverability, check, measure
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger
from mailflow.warehouse.engine import SETTING, safe_url, unreachable
from mailflow.warehouse.schema import send_ledger


def check_warehouse(res: Resources) -> None:
    """The warehouse answers and has mailflow's tables.

    Raises:
        ConfigError: it cannot be reached, or it was never migrated; the message names
            the setting and the URL (password hidden).
    """
    url = res.settings.warehouse_url
    try:
        with res.engine.connect() as conn:
            migrated = inspect(conn).has_table(send_ledger.name)
    except SQLAlchemyError as exc:
        raise unreachable(url, exc) from None
    if not migrated:
        raise ConfigError(
            f"the warehouse at {safe_url(url)} ({SETTING}) has no mailflow tables: run "
            "`mailflow db upgrade` against it first (or fix the URL if this is the wrong one)."
        )


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
