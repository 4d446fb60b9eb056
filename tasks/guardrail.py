"""Pre-flight check: refuse to send while deliverability is in trouble."""

from __future__ import annotations

from datetime import datetime, timedelta

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.guardrail import check, measure
from mailflow.settings import get_settings
from mailflow.warehouse.engine import get_engine


@task(name="deliverability-guardrail", cache_policy=NONE, persist_result=False)
def check_deliverability(now: datetime) -> None:
    """Raise ``GuardrailTripped`` when recent bounce or complaint rates are too high."""
    s = get_settings()
    with get_engine().connect() as conn:
        d = measure(conn, now=now, window=timedelta(days=s.guardrail_window_days))
    get_run_logger().info(
        "deliverability over %g days: %d sent, bounce rate %.2f%%, complaint rate %.3f%%",
        s.guardrail_window_days,
        d.sent,
        100 * d.bounce_rate,
        100 * d.complaint_rate,
    )
    check(
        d,
        max_bounce_rate=s.guardrail_max_bounce_rate,
        max_complaint_rate=s.guardrail_max_complaint_rate,
        min_sent=s.guardrail_min_sent,
    )
