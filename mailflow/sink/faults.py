"""Latency and faults on demand: the runtime state behind ``/_sink/faults``.

For each authorised ``POST /v3/mail/send`` the app asks ``FaultState.judge`` for a
verdict, in this order: the scripted queue (deterministic, consumed in order),
the rate-limit window, then the random rates. Latency, jitter and "slow" apply
to every mail-send request, faulted or not. All of it runs on the event loop
thread, so no locks are needed.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailflow.sink.config import FaultSettings, ScriptStep

__all__ = ["FaultState", "Verdict"]

#: X-RateLimit-Limit sent with a scripted 429 when no rate limit is configured
#: (600 per minute is SendGrid's usual limit on its v3 endpoints).
_DEFAULT_LIMIT_HEADER = 600


@dataclass(slots=True)
class Verdict:
    """What to do with one request: answer ``status`` (202 = handle normally) or drop it,
    after ``extra_delay_s``; ``headers`` are the ``X-RateLimit-*`` headers to send."""

    status: int = 202
    drop: bool = False
    extra_delay_s: float = 0.0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class FaultState:
    """The live fault settings, the remaining script, the RNG and the rate-limit window."""

    def __init__(self, settings: FaultSettings, clock: Callable[[], float] = time.time) -> None:
        self._initial = settings
        self._clock = clock
        self._apply(settings, reseed=True)

    def _apply(self, settings: FaultSettings, *, reseed: bool) -> None:
        self._settings = settings
        if reseed:
            self._rng = random.Random(settings.seed)
        self._script: deque[list[Any]] = deque([step, step.count] for step in settings.script)
        self._window_end = 0.0
        self._window_count = 0
        self._recipients: Mapping[str, int] = settings.fail_recipients

    @property
    def settings(self) -> FaultSettings:
        """The settings in force (``script`` as configured, see ``snapshot`` for what is left)."""
        return self._settings

    def update(self, changes: Mapping[str, object]) -> FaultSettings:
        """Apply a partial update (keys of ``FaultSettings``); a given ``script`` replaces
        the remaining one, a given ``seed`` reseeds the RNG.

        Raises:
            ConfigError: an unknown key or a bad value; nothing is changed then.
        """
        new = self._settings.updated(changes)
        remaining = list(self._script)
        window = (self._window_end, self._window_count)
        self._apply(new, reseed="seed" in changes)
        if "script" not in changes:
            self._script = deque(remaining)
        if "rate_limit" not in changes and "rate_limit_window_s" not in changes:
            self._window_end, self._window_count = window
        return new

    def reset(self) -> FaultSettings:
        """Back to the start-up settings (script refilled, RNG reseeded)."""
        self._apply(self._initial, reseed=True)
        return self._initial

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready settings, with ``script`` showing the steps still to be used."""
        data = self._settings.to_dict()
        data["script"] = [
            {**step.to_dict(), "count": left} for step, left in self._script if left > 0
        ]
        return data

    def delay_s(self) -> float:
        """Latency for one request: ``latency_ms`` ± ``jitter_ms``, plus ``slow_ms`` for a
        ``slow_rate`` share of requests (to provoke client timeouts)."""
        s = self._settings
        ms = s.latency_ms
        if s.jitter_ms:
            ms = max(0.0, ms + self._rng.uniform(-s.jitter_ms, s.jitter_ms))
        if s.slow_rate and self._rng.random() < s.slow_rate:
            ms += s.slow_ms
        return ms / 1000.0

    def judge(self) -> Verdict:
        """The verdict for the next authorised mail-send request (consumes the script)."""
        s = self._settings
        if self._script:
            step: ScriptStep = self._script[0][0]
            self._script[0][1] -= 1
            if self._script[0][1] <= 0:
                self._script.popleft()
            if step.drop or step.status != 202:
                verdict = Verdict(step.status, step.drop, step.delay_ms / 1000.0)
                if step.status == 429 and not step.drop:
                    limit = s.rate_limit or _DEFAULT_LIMIT_HEADER
                    reset = math.ceil(self._clock() + step.reset_in)
                    verdict.headers = _rate_headers(limit, 0, reset)
                return verdict
            extra = step.delay_ms / 1000.0
        else:
            extra = 0.0
        verdict = Verdict(extra_delay_s=extra)
        if s.rate_limit:
            # A fixed window that opens with the first request after the previous one
            # closed (not aligned to the clock), so a test's requests share one window.
            now = self._clock()
            if now >= self._window_end:
                self._window_end, self._window_count = now + s.rate_limit_window_s, 0
            self._window_count += 1
            remaining = s.rate_limit - self._window_count
            verdict.headers = _rate_headers(
                s.rate_limit, max(remaining, 0), math.ceil(self._window_end)
            )
            if remaining < 0:
                verdict.status = 429
                return verdict
        fault_rate = s.drop_rate + s.error_rate_500 + s.error_rate_503
        if fault_rate:
            draw = self._rng.random()
            if draw < s.drop_rate:
                verdict.drop = True
            elif draw < s.drop_rate + s.error_rate_500:
                verdict.status = 500
            elif draw < fault_rate:
                verdict.status = 503
        return verdict

    def recipient_fault(self, emails: Iterable[tuple[str, str]]) -> tuple[int, str] | None:
        """The first ``fail_recipients`` match among ``(field, email)`` pairs, as
        ``(status, field)``; None when no recipient is scripted to fail."""
        if not self._recipients:
            return None
        for where, email in emails:
            status = self._recipients.get(email.lower())
            if status is not None and status != 202:
                return status, where
        return None


def _rate_headers(limit: int, remaining: int, reset: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit", str(limit).encode()),
        (b"x-ratelimit-remaining", str(remaining).encode()),
        (b"x-ratelimit-reset", str(reset).encode()),
    ]
