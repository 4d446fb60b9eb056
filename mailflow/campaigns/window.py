"""Quiet hours: when a message may arrive, in the recipient's own timezone.

A planned message can carry a send window in its render context (``send_window``:
timezone, local start and end, weekdays). At send time :func:`schedule` says whether it
goes now, goes with SendGrid's ``send_at`` at the window's next opening (at most 72 h
ahead, SendGrid's limit), or waits for a later run. Nothing is ever dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: SendGrid refuses ``send_at`` further ahead than this.
MAX_SEND_AT_AHEAD = timedelta(hours=72)
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Schedule:
    """When one message goes: ``now`` (send_at None), at ``send_at``, or ``later``."""

    send_at: datetime | None  # aware UTC; None = now (or later, see ``later``)
    later: bool = False  # the next opening is beyond SendGrid's 72 h: a later run sends it
    opens_at: datetime | None = None  # the next opening (aware UTC), when not now

    @property
    def send_at_unix(self) -> int | None:
        return int(self.send_at.timestamp()) if self.send_at is not None else None


def window_context(
    timezone: str | None, *, start: time, end: time, days: list[str]
) -> dict[str, Any]:
    """The JSON-friendly ``send_window`` value stored with a planned message."""
    return {
        "timezone": timezone or "UTC",
        "start": start.strftime("%H:%M"),
        "end": end.strftime("%H:%M"),
        "days": list(days),
    }


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        # Customer data: an unknown zone must not lose the message; UTC is the safe guess.
        return ZoneInfo("UTC")


def next_opening(now: datetime, window: Mapping[str, Any]) -> datetime | None:
    """The next moment at or after ``now`` inside the window (aware UTC); None if inside now.

    ``now`` is naive UTC or aware. DST gaps and folds resolve with ``zoneinfo``'s rules
    (a local start that does not exist on a spring-forward day maps to the shifted time).
    """
    zone = _zone(str(window.get("timezone") or "UTC"))
    start = time.fromisoformat(str(window["start"]))
    end = time.fromisoformat(str(window["end"]))
    days = {_DAYS.index(d) for d in window.get("days") or _DAYS}
    now_utc = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    local = now_utc.astimezone(zone)
    if local.weekday() in days and start <= local.time() < end:
        return None
    for ahead in range(8):
        day = local.date() + timedelta(days=ahead)
        if day.weekday() not in days:
            continue
        opening = datetime.combine(day, start, tzinfo=zone)
        if opening.astimezone(UTC) > now_utc:
            return opening.astimezone(UTC)
    raise AssertionError("a window with at least one weekday opens within 8 days")


def schedule(window: Mapping[str, Any] | None, now: datetime) -> Schedule:
    """Now, at the next opening via ``send_at``, or later (beyond 72 h)."""
    if not window:
        return Schedule(send_at=None)
    opening = next_opening(now, window)
    if opening is None:
        return Schedule(send_at=None)
    now_utc = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    # A minute of margin: the request takes time and SendGrid judges against its own clock.
    if opening - now_utc > MAX_SEND_AT_AHEAD - timedelta(minutes=1):
        return Schedule(send_at=None, later=True, opens_at=opening)
    return Schedule(send_at=opening, opens_at=opening)
