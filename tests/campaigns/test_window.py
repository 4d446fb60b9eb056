"""Quiet hours in the recipient's timezone: now, send_at at the next opening, or later."""

from __future__ import annotations

from datetime import UTC, datetime, time

from mailflow.campaigns.window import schedule, window_context


def window(tz: str, days: list[str] | None = None) -> dict[str, object]:
    return window_context(
        tz,
        start=time(8, 0),
        end=time(21, 0),
        days=days or ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
    )


# Wednesday 2025-01-15 06:30 UTC.
NOW = datetime(2025, 1, 15, 6, 30)


def test_inside_the_window_goes_now() -> None:
    # 07:30 in Berlin is still quiet; 15:30 in Tokyo is inside.
    assert schedule(window("Asia/Tokyo"), NOW).send_at is None
    assert not schedule(window("Asia/Tokyo"), NOW).later


def test_outside_the_window_is_scheduled_for_the_local_opening_across_timezones() -> None:
    berlin = schedule(window("Europe/Berlin"), NOW)
    assert berlin.send_at == datetime(2025, 1, 15, 7, 0, tzinfo=UTC)  # 08:00 CET
    new_york = schedule(window("America/New_York"), NOW)  # 01:30 EST
    assert new_york.send_at == datetime(2025, 1, 15, 13, 0, tzinfo=UTC)  # 08:00 EST
    sydney = schedule(window("Australia/Sydney"), datetime(2025, 1, 15, 11, 0))  # 22:00 AEDT
    assert sydney.send_at == datetime(2025, 1, 15, 21, 0, tzinfo=UTC)  # 08:00 AEDT next day
    assert all(s.send_at_unix is not None for s in (berlin, new_york, sydney))


def test_daylight_saving_time_is_the_local_rule_of_that_day() -> None:
    # Berlin moves to CEST on 2025-03-30: 08:00 local is 06:00 UTC that day.
    sunday_night = datetime(2025, 3, 29, 22, 0)
    assert schedule(window("Europe/Berlin"), sunday_night).send_at == datetime(
        2025, 3, 30, 6, 0, tzinfo=UTC
    )


def test_weekdays_only_and_beyond_72_hours_is_left_for_a_later_run() -> None:
    friday_night = datetime(2025, 1, 17, 21, 30)  # 22:30 in Berlin
    monday = schedule(window("Europe/Berlin", ["mon", "tue", "wed", "thu", "fri"]), friday_night)
    assert monday.send_at == datetime(2025, 1, 20, 7, 0, tzinfo=UTC) and not monday.later
    only_thursday = schedule(window("Europe/Berlin", ["thu"]), friday_night)
    assert only_thursday.later and only_thursday.send_at is None
    assert only_thursday.opens_at == datetime(2025, 1, 23, 7, 0, tzinfo=UTC)


def test_an_unknown_timezone_is_treated_as_utc_not_dropped() -> None:
    s = schedule(window("Mars/Olympus_Mons"), NOW)
    assert s.send_at == datetime(2025, 1, 15, 8, 0, tzinfo=UTC)
