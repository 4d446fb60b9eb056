"""Flow ``weekly-digest``: a weekly personal summary at each customer's local time (marketing)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo

from prefect import flow
from pydantic import Field

from flows.pipeline import run_trigger
from mailflow.pipeline.options import BATCH_SIZE, MAX_BAD_SHARE, BatchSize, MaxBadShare
from mailflow.pipeline.summary import RunSummary
from mailflow.runners import configured_task_runner
from mailflow.triggers.weekly_digest import WEEKDAYS, Weekday
from tasks.timezones import report_timezone_fallbacks


@flow(
    name="weekly-digest",
    description="Weekly picks and open cart, sent at a fixed local time in each customer's "
    "timezone. Runs hourly; each run sends to the timezones that are due.",
    task_runner=configured_task_runner(),
)
def weekly_digest(
    weekday: Weekday = "monday",
    hour: Annotated[int, Field(ge=0, le=23)] = 9,
    window_hours: Annotated[int, Field(ge=1, le=24)] = 1,
    open_cart_days: Annotated[float, Field(gt=0, le=90)] = 14.0,
    batch_size: BatchSize = BATCH_SIZE,
    max_bad_share: MaxBadShare = MAX_BAD_SHARE,
    override_guardrail: bool = False,
) -> RunSummary:
    """Send the digest to customers whose local time is in the weekly slot now.

    Args:
        weekday: Local day of the week the digest goes out.
        hour: Local hour (0-23) the digest goes out.
        window_hours: A timezone stays due this many hours after the slot starts; more
            than 1 lets a late or missed hourly run catch up (never a second digest).
        open_cart_days: An open cart touched within this many days is shown in the digest.
        batch_size: Messages per send task (one Prefect task, retried as a unit).
        max_bad_share: Fail the run when more than this share of new rows is bad.
        override_guardrail: Send even though recent bounce or complaint rates are too high.
    """
    report_timezone_fallbacks(weekday, hour, window_hours)
    return run_trigger(
        "weekly_digest",
        {
            "weekday": weekday,
            "hour": hour,
            "window_hours": window_hours,
            "open_cart_days": open_cart_days,
        },
        batch_size=batch_size,
        max_bad_share=max_bad_share,
        override_guardrail=override_guardrail,
    )


def demo_run(*, timezone: str = "Europe/Berlin") -> RunSummary:
    """For the demo: make the slot *now* in ``timezone`` and send to everyone due there.

    The weekday and hour are those of the current local time in ``timezone``, so the
    customers of that zone (and of every zone with the same local hour) get their digest.
    """
    local = datetime.now(UTC).astimezone(ZoneInfo(timezone))
    return weekly_digest(weekday=WEEKDAYS[local.weekday()], hour=local.hour)
