"""Local-time triggers: say which customers' timezone names are not usable."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.clock import utcnow
from mailflow.triggers.weekly_digest import due_timezones, invalid_timezones
from mailflow.warehouse.engine import get_engine

_SHOWN = 10


@task(name="check-timezones", cache_policy=NONE, persist_result=False)
def report_timezone_fallbacks(weekday: str, hour: int, window_hours: int) -> dict[str, int]:
    """When the UTC slot is due, warn about customers whose timezone is not an IANA name.

    They are sent at the UTC slot (the digest treats an invalid name as UTC); the warning
    names each value and how many customers have it, so the data can be fixed.

    Returns:
        Customers per invalid timezone value (empty when the UTC slot is not due).
    """
    if "UTC" not in due_timezones(utcnow(), weekday=weekday, hour=hour, window_hours=window_hours):
        return {}
    with get_engine().connect() as conn:
        bad = invalid_timezones(conn)
    if bad:
        shown = ", ".join(f"{name!r} ({n})" for name, n in list(bad.items())[:_SHOWN])
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        get_run_logger().warning(
            "%d customers have a timezone that is not an IANA name: %s%s. They get the "
            "digest at the UTC slot. Fix customers.timezone (names like 'Europe/Berlin', "
            "'America/New_York'; case matters)",
            sum(bad.values()),
            shown,
            more,
        )
    return bad
