"""Configuration of the local SendGrid API: keys, memory bound, latency and faults.

Everything is checked when it is built (at start-up or on ``POST /_sink/faults``):
a nonsense value raises ``ConfigError`` naming the field and the fix, rather
than being clamped silently, because a test that asked for a fault must get it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailflow.errors import ConfigError
from mailflow.settings import DEMO_API_KEY

__all__ = ["FAULT_STATUSES", "FaultSettings", "ScriptStep", "SinkConfig"]

#: Statuses a scripted step or ``fail_recipients`` may answer with (202 = no fault).
FAULT_STATUSES = frozenset({202, 400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504})
_MAX_BODY = 30 * 1024 * 1024  # SendGrid: "the total message size must be less than 30MB"


def _number(name: str, value: object, *, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ConfigError(f"{name} must be {bound}, got {value!r}.")
    return float(value)


def _integer(name: str, value: object, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value!r}.")
    return value


def _status(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in FAULT_STATUSES:
        allowed = ", ".join(str(s) for s in sorted(FAULT_STATUSES))
        raise ConfigError(f"{name} must be one of {allowed}; got {value!r}.")
    return value


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One scripted answer, used by the next ``count`` mail-send requests in order.

    ``status`` 202 means "handle normally" (useful with ``delay_ms``); ``drop`` closes
    the connection without an answer; ``reset_in`` sets ``X-RateLimit-Reset`` for 429.
    """

    status: int = 503
    count: int = 1
    reset_in: float = 1.0
    delay_ms: float = 0.0
    drop: bool = False

    @classmethod
    def from_mapping(cls, data: object, where: str = "script") -> ScriptStep:
        """Build a step from JSON such as ``{"status": 429, "count": 2, "reset_in": 1}``."""
        if isinstance(data, ScriptStep):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be an object like {{'status': 503, 'count': 3}}.")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"{where} has unknown keys {sorted(unknown)}; "
                "use status, count, reset_in, delay_ms, drop."
            )
        drop = data.get("drop", False)
        if not isinstance(drop, bool):
            raise ConfigError(f"{where}.drop must be true or false, got {drop!r}.")
        if "status" not in data and not drop:
            raise ConfigError(f"{where} needs a status (e.g. 503) or drop: true.")
        return cls(
            status=_status(f"{where}.status", data.get("status", 202)),
            count=_integer(f"{where}.count", data.get("count", 1), low=1),
            reset_in=_number(f"{where}.reset_in", data.get("reset_in", 1.0)),
            delay_ms=_number(f"{where}.delay_ms", data.get("delay_ms", 0.0)),
            drop=drop,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the same keys ``from_mapping`` takes)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """Latency and faults of ``POST /v3/mail/send``; all off by default.

    Rates are probabilities in [0, 1] drawn from a RNG seeded with ``seed`` (None:
    unseeded); ``drop_rate + error_rate_500 + error_rate_503`` must not pass 1.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_limit: int = 0
    rate_limit_window_s: float = 1.0
    error_rate_500: float = 0.0
    error_rate_503: float = 0.0
    drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 30_000.0
    seed: int | None = None
    script: tuple[ScriptStep, ...] = ()
    fail_recipients: Mapping[str, int] = field(default_factory=dict)

    def updated(self, changes: Mapping[str, object]) -> FaultSettings:
        """A copy with ``changes`` applied and checked.

        Raises:
            ConfigError: an unknown key or a bad value (the message names it).
        """
        unknown = set(changes) - set(FAULT_FIELDS)
        if unknown:
            raise ConfigError(
                f"Unknown fault settings {sorted(unknown)}; known: {', '.join(FAULT_FIELDS)}."
            )
        values: dict[str, Any] = {}
        for name, value in changes.items():
            values[name] = _check_fault(name, value)
        result = dataclasses.replace(self, **values)
        total = result.drop_rate + result.error_rate_500 + result.error_rate_503
        if total > 1.0:
            raise ConfigError(
                f"drop_rate + error_rate_500 + error_rate_503 must not exceed 1, got {total:g}."
            )
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the same keys ``updated`` takes)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["script"] = [step.to_dict() for step in self.script]
        data["fail_recipients"] = dict(self.fail_recipients)
        return data


FAULT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FaultSettings))


def _check_fault(name: str, value: object) -> Any:
    if name in ("latency_ms", "jitter_ms", "slow_ms"):
        return _number(name, value)
    if name == "rate_limit_window_s":
        seconds = _number(name, value)
        if seconds <= 0:
            raise ConfigError("rate_limit_window_s must be greater than 0.")
        return seconds
    if name in ("error_rate_500", "error_rate_503", "drop_rate", "slow_rate"):
        return _number(name, value, high=1.0)
    if name == "rate_limit":
        return _integer(name, value)
    if name == "seed":
        return None if value is None else _integer(name, value)
    if name == "script":
        if not isinstance(value, list | tuple):
            raise ConfigError("script must be a list of steps like [{'status': 503, 'count': 3}].")
        return tuple(ScriptStep.from_mapping(s, f"script.{i}") for i, s in enumerate(value))
    if name == "fail_recipients":
        if not isinstance(value, Mapping):
            raise ConfigError(
                "fail_recipients must map an address to a status, e.g. {'a@x.io': 400}."
            )
        return {
            str(email).lower(): _status(f"fail_recipients.{email}", status)
            for email, status in value.items()
        }
    raise AssertionError(name)  # pragma: no cover - guarded by FAULT_FIELDS


_EVENT_RATES = (
    "open_rate",
    "machine_open_rate",
    "click_rate",
    "unsubscribe_rate",
    "spam_rate",
    "bounce_rate",
    "duplicate_rate",
)


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """What a local SendGrid API accepts and how it behaves.

    ``api_keys`` open ``/v3/mail/send``; ``forbidden_keys`` are valid keys without the
    ``mail.send`` scope (403). ``keep`` bounds the messages held in memory (oldest
    dropped, all counted). ``validate`` turns payload validation off for raw speed tests.

    With ``webhook_url`` set, accepted messages yield engagement events posted there
    like SendGrid's Signed Event Webhook (see ``mailflow.sink.events``), signed with
    ``webhook_private_key`` (PEM; None: a key pair generated at start-up, its public
    half served at ``GET /_sink/webhook-key``). ``click_rate`` is a share of opens;
    ``machine_open_rate`` is the share of delivered messages whose
    pixel a privacy proxy fetches (an ``open`` flagged ``sg_machine_open``);
    ``duplicate_rate`` is the share of batches posted twice; ``events_seed`` seeds the
    outcome RNG.

    ``count_arg`` names a ``custom_args`` key (e.g. ``ledger_id``) whose values the sink
    counts over every accepted message, dropped from ``keep`` or not, so a benchmark can
    check one message per id at a million messages (``GET /_sink/tally``).
    """

    api_keys: tuple[str, ...] = (DEMO_API_KEY,)
    forbidden_keys: tuple[str, ...] = ()
    keep: int = 200_000
    validate: bool = True
    max_body_bytes: int = _MAX_BODY
    faults: FaultSettings = field(default_factory=FaultSettings)
    webhook_url: str | None = None
    webhook_private_key: str | None = field(default=None, repr=False)
    open_rate: float = 0.4
    machine_open_rate: float = 0.25
    click_rate: float = 0.15
    unsubscribe_rate: float = 0.01
    spam_rate: float = 0.002
    bounce_rate: float = 0.01
    duplicate_rate: float = 0.0
    event_batch_size: int = 500
    event_flush_ms: float = 200.0
    events_seed: int | None = None
    count_arg: str | None = None

    def __post_init__(self) -> None:
        if not self.api_keys:
            raise ConfigError("api_keys is empty; give at least one key (e.g. the demo key).")
        _integer("keep", self.keep, low=1)
        _integer("max_body_bytes", self.max_body_bytes, low=1)
        url = self.webhook_url
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise ConfigError(
                f"webhook_url must be an http(s) URL such as "
                f"http://127.0.0.1:8000/webhooks/sendgrid/events, got {url!r}."
            )
        key = self.webhook_private_key
        if key is not None and (not isinstance(key, str) or "PRIVATE KEY" not in key):
            raise ConfigError("webhook_private_key must be PEM text (-----BEGIN PRIVATE KEY-----).")
        for name in _EVENT_RATES:
            _number(name, getattr(self, name), high=1.0)
        _integer("event_batch_size", self.event_batch_size, low=1)
        _number("event_flush_ms", self.event_flush_ms)
        if self.events_seed is not None:
            _integer("events_seed", self.events_seed)

    @classmethod
    def build(cls, **overrides: Any) -> SinkConfig:
        """A config from flat keyword overrides: sink fields and fault fields alike.

        ``SinkConfig.build(latency_ms=50, keep=1000)`` sets ``faults.latency_ms`` and ``keep``.

        Raises:
            ConfigError: an unknown key or a bad value.
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"faults"}
        faults = overrides.pop("faults", None) or FaultSettings()
        if isinstance(faults, Mapping):
            faults = FaultSettings().updated(faults)
        fault_changes = {k: v for k, v in overrides.items() if k not in own}
        sink_values = {k: v for k, v in overrides.items() if k in own}
        for name in ("api_keys", "forbidden_keys"):
            if name in sink_values:
                keys = sink_values[name]
                sink_values[name] = (keys,) if isinstance(keys, str) else tuple(keys)
        return cls(**sink_values, faults=faults.updated(fault_changes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``SinkConfig.build(**config.to_dict())`` gives it back."""
        data: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "faults"
        }
        data["api_keys"] = list(self.api_keys)
        data["forbidden_keys"] = list(self.forbidden_keys)
        data["faults"] = self.faults.to_dict()
        return data
