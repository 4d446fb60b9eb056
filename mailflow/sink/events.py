"""Engagement events of the local SendGrid API, posted like SendGrid's Signed Event Webhook.

Each accepted message yields, per recipient, ``processed`` then ``delivered`` (or a
``bounce`` / ``dropped`` / ``deferred``), then maybe ``open``, ``click``,
``unsubscribe`` and ``spamreport``. Outcomes are drawn from a RNG seeded with
``events_seed`` and the message (its request body), so a seeded sink gives each message
the same outcome whatever order concurrent requests arrive in; some addresses have fixed
outcomes, by how their local part starts:

    bounce...   bounce (type "bounce", 550 5.1.1)
    blocked...  bounce (type "blocked")
    drop...     dropped ("Bounced Address")
    defer...    deferred, then delivered
    spam...     delivered, spamreport
    unsub...    delivered, open, unsubscribe
    open...     delivered, open, click
    mpp...      delivered, a machine open (``sg_machine_open: true``) and nothing else

Like SendGrid with Apple Mail Privacy Protection, a share (``machine_open_rate``) of the
other delivered messages also gets a machine open: an ``open`` flagged
``sg_machine_open: true``, timestamped at delivery (the proxy fetches the pixel then,
whether or not anyone reads). ``processed``, ``delivered`` and machine opens carry the
time the message was received; a human open comes seconds to minutes later and a click
after it, so times to open are realistic (and an open never shares a natural key with
the machine open of the same message). Machine opens and those delays are drawn from a
second RNG, so the outcomes of a seeded sink stay the ones they were without them.

A background task on the server's loop batches the events and POSTs each batch as a
JSON array to ``webhook_url``, signed with ECDSA P-256 like SendGrid (headers
``X-Twilio-Email-Event-Webhook-Signature`` / ``-Timestamp``). Failed posts are retried
with a bounded backoff; the mail-send path only appends to a queue, so it never waits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import logging
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailflow.errors import ConfigError
from mailflow.sink.config import SinkConfig
from mailflow.sink.store import MessageRecord, Recipient
from mailflow.webhook import signing

__all__ = [
    "DEFAULT_CLICK_URL",
    "EventEmitter",
    "OutcomeHook",
    "events_for",
    "fixed_outcome",
    "load_private_key",
]

logger = logging.getLogger(__name__)

#: Clicked when the html content has no https link.
DEFAULT_CLICK_URL = "https://shop.example.com"
#: Events held waiting for the webhook; past this the oldest are discarded (and counted).
MAX_PENDING = 1_000_000
_MAX_ATTEMPTS = 5
_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 5.0
_POST_TIMEOUT_S = 10.0
#: How long a shutdown may spend posting what is still pending.
SHUTDOWN_FLUSH_S = 5.0

_LINK = re.compile(r"""https://[^\s"'<>]+""")
_USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
_BOUNCE_REASON = "550 5.1.1 The email account that you tried to reach does not exist."
_BLOCKED_REASON = "550 5.7.1 Message rejected due to local policy (blocked by the receiver)."
#: What SendGrid reports for an open fetched by Apple's privacy proxy.
_PROXY_USER_AGENT = "Mozilla/5.0"
#: Mean delay of a human open after delivery, and of a click after the open (seconds).
_OPEN_DELAY_S = 600.0
_CLICK_DELAY_S = 90.0


def load_private_key(pem: str) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 private key from PEM text.

    Raises:
        ConfigError: not a PEM private key, or not P-256.
    """
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"webhook_private_key is not an unencrypted PEM key ({exc}).") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("webhook_private_key must be an ECDSA P-256 (SECP256R1) private key.")
    return key


def _public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def _click_url(payload: Any) -> str:
    contents = payload.get("content") if isinstance(payload, dict) else None
    for part in contents if isinstance(contents, list) else ():
        if isinstance(part, dict) and part.get("type") == "text/html":
            value = part.get("value")
            found = _LINK.search(value) if isinstance(value, str) else None
            if found:
                return html.unescape(found.group(0))
    return DEFAULT_CLICK_URL


_FIXED_OUTCOMES = (
    ("bounce", ("bounce",)),
    ("blocked", ("blocked",)),
    ("drop", ("dropped",)),
    ("defer", ("deferred", "delivered")),
    ("spam", ("delivered", "spamreport")),
    ("unsub", ("delivered", "open", "unsubscribe")),
    ("open", ("delivered", "open", "click")),
    ("mpp", ("delivered", "machine_open")),
)


def fixed_outcome(local: str) -> tuple[str, ...] | None:
    """The outcome of a local part with a fixed one (see the module doc), else None."""
    for prefix, names in _FIXED_OUTCOMES:
        if local.startswith(prefix):
            return names
    return None


def _outcome(
    local: str, config: SinkConfig, rng: random.Random, timing: random.Random
) -> list[str]:
    """Event names after ``processed`` for one recipient, in order."""
    fixed = fixed_outcome(local)
    if fixed is not None:
        return list(fixed)
    if rng.random() < config.bounce_rate:
        return ["bounce"]
    names = ["delivered"]
    if timing.random() < config.machine_open_rate:
        names.append("machine_open")
    if rng.random() < config.open_rate:
        names.append("open")
        if rng.random() < config.click_rate:
            names.append("click")
    if rng.random() < config.unsubscribe_rate:
        names.append("unsubscribe")
    if rng.random() < config.spam_rate:
        names.append("spamreport")
    return names


def _event_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")


#: Told each outcome as it is decided: (address, event name, unix time of the message).
OutcomeHook = Callable[[str, str, int], None]


def events_for(
    record: MessageRecord,
    config: SinkConfig,
    rng: random.Random,
    on_outcome: OutcomeHook | None = None,
    timing: random.Random | None = None,
) -> list[dict[str, Any]]:
    """The events SendGrid would report for every recipient of ``record``.

    ``on_outcome`` hears every event name decided for a recipient (the sink's
    suppression lists are fed this way). ``timing`` draws machine opens and the delays
    of human opens and clicks (default: ``rng``)."""
    timing = rng if timing is None else timing
    payload = record.payload
    click_url: str | None = None
    ts = int(record.received_ts)
    out: list[dict[str, Any]] = []
    recipients: list[Recipient] = record.recipients_detail()
    for index, recipient in enumerate(recipients):
        sg_message_id = (
            f"{record.message_id}.filterdrecv-{rng.randrange(10**9):09d}-"
            f"{secrets.token_hex(4)}-1-{index}.0"
        )
        base: dict[str, Any] = {
            **recipient.custom_args,  # SendGrid's own fields win over custom_args
            "email": recipient.email,
            "timestamp": ts,
            "smtp-id": f"<{record.message_id}@mailflow.sink>",
            "sg_message_id": sg_message_id,
            "category": list(recipient.categories),
        }
        local = recipient.email.partition("@")[0].lower()
        names = ["processed", *_outcome(local, config, rng, timing)]
        opened_at = ts + 1 + int(timing.expovariate(1 / _OPEN_DELAY_S))
        for name in names:
            if on_outcome is not None:
                on_outcome(recipient.email, "open" if name == "machine_open" else name, ts)
            event = {**base, "event": name, "sg_event_id": _event_id()}
            if name == "blocked":
                event.update(event="bounce", type="blocked", status="5.7.1", reason=_BLOCKED_REASON)
            elif name == "bounce":
                event.update(
                    type="bounce",
                    status="5.1.1",
                    reason=_BOUNCE_REASON,
                    bounce_classification="Invalid Address",
                )
            elif name == "dropped":
                event.update(reason="Bounced Address", status="5.0.0")
            elif name == "deferred":
                event.update(response="421 4.7.0 Try again later", attempt="1")
            elif name == "delivered":
                event.update(response="250 2.0.0 OK", tls=1)
            elif name == "machine_open":
                event.update(
                    event="open",
                    sg_machine_open=True,
                    useragent=_PROXY_USER_AGENT,
                    ip=f"17.58.{timing.randrange(1, 255)}.{timing.randrange(1, 255)}",
                )
            elif name in ("open", "click"):
                event.update(useragent=_USER_AGENT, ip=f"203.0.113.{rng.randrange(1, 255)}")
                if name == "open":
                    event.update(sg_machine_open=False, timestamp=opened_at)
                else:
                    if click_url is None:
                        click_url = _click_url(payload)
                    clicked_at = opened_at + 1 + int(timing.expovariate(1 / _CLICK_DELAY_S))
                    event.update(
                        url=click_url,
                        url_offset={"index": 0, "type": "html"},
                        timestamp=clicked_at,
                    )
            out.append(event)
    return out


class EventEmitter:
    """Queues the events of accepted messages and posts them, signed, in batches.

    ``on_accept`` is the sink's accept hook; the posting task starts on first use
    (on the running loop) and ``aclose`` flushes what is pending, within a bound.
    """

    def __init__(self, config: SinkConfig, on_outcome: OutcomeHook | None = None) -> None:
        if not config.webhook_url:
            raise ConfigError("EventEmitter needs webhook_url.")
        self.config = config
        self.on_outcome = on_outcome
        self.url = config.webhook_url
        if config.webhook_private_key:
            self._key = load_private_key(config.webhook_private_key)
        else:
            self._key, _ = signing.generate_keypair()
        #: The verification key a webhook needs (base64 DER, as SendGrid shows it).
        self.public_key_b64 = _public_b64(self._key)
        self._rng = random.Random(config.events_seed)
        seed = config.events_seed
        self._timing = random.Random(None if seed is None else f"timing:{seed}")
        self._pending: deque[dict[str, Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.generated = 0
        self.posted = 0
        self.failed = 0
        self.discarded = 0
        self.batches = 0
        self.retries = 0
        self.duplicate_batches = 0

    def _rngs(self, record: MessageRecord) -> tuple[random.Random, random.Random]:
        """The outcome and timing RNGs for ``record``'s events.

        Seeded, they are derived from the seed and the message itself (its request
        body: recipients, ``custom_args`` and all), so each message's outcome is the
        same whatever order concurrent batches arrive in; unseeded, the emitter's shared
        RNGs."""
        seed = self.config.events_seed
        if seed is None:
            return self._rng, self._timing
        return (
            random.Random(b"%d:" % seed + record.raw),
            random.Random(b"timing:%d:" % seed + record.raw),
        )

    def on_accept(self, record: MessageRecord) -> None:
        """Queue the events of one accepted message (runs on the loop; never waits)."""
        rng, timing = self._rngs(record)
        events = events_for(record, self.config, rng, self.on_outcome, timing)
        self.generated += len(events)
        was_empty = not self._pending
        self._pending.extend(events)
        overflow = len(self._pending) - MAX_PENDING
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            self.discarded += overflow
        self._ensure_started()
        if self._wake is not None and (
            was_empty or len(self._pending) >= self.config.event_batch_size
        ):
            self._wake.set()

    def _ensure_started(self) -> None:
        if self._task is not None or self._closing:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="mailflow-sink-events"
        )

    def stats(self) -> dict[str, Any]:
        """Counters for ``GET /_sink/stats`` (under ``events``)."""
        return {
            "webhook_url": self.url,
            "generated": self.generated,
            "pending": len(self._pending),
            "posted": self.posted,
            "failed": self.failed,
            "discarded": self.discarded,
            "batches": self.batches,
            "retries": self.retries,
            "duplicate_batches": self.duplicate_batches,
        }

    async def aclose(self, timeout: float = SHUTDOWN_FLUSH_S) -> None:
        """Post what is pending (for at most ``timeout`` seconds), then stop the task."""
        self._closing = True
        task = self._task
        if task is None:
            return
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            logger.warning("%d webhook events not posted at shutdown", len(self._pending))
            self.discarded += len(self._pending)
            self._pending.clear()

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        size = self.config.event_batch_size
        flush_s = self.config.event_flush_ms / 1000
        async with httpx.AsyncClient(timeout=_POST_TIMEOUT_S, trust_env=False) as client:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    wake.clear()
                    await wake.wait()
                    continue
                if len(self._pending) < size and not self._closing and flush_s > 0:
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(flush_s):
                            await wake.wait()  # set when a batch fills or at shutdown
                batch = [self._pending.popleft() for _ in range(min(size, len(self._pending)))]
                body = orjson.dumps(batch)
                if await self._post(client, body):
                    self.posted += len(batch)
                    self.batches += 1
                    if self.config.duplicate_rate and (
                        self._rng.random() < self.config.duplicate_rate
                    ):
                        self.duplicate_batches += 1
                        await self._post(client, body)
                else:
                    self.failed += len(batch)

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> bool:
        """POST one signed batch; True once answered 2xx, False after the last attempt."""
        problem = ""
        for attempt in range(_MAX_ATTEMPTS):
            if attempt:
                self.retries += 1
                delay = min(_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                await asyncio.sleep(delay / 4 if self._closing else delay)
            timestamp = str(int(time.time()))
            headers = {
                "content-type": "application/json",
                signing.SIGNATURE_HEADER: signing.sign(self._key, timestamp, body),
                signing.TIMESTAMP_HEADER: timestamp,
            }
            try:
                response = await client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
                continue
            if 200 <= response.status_code < 300:
                return True
            problem = f"HTTP {response.status_code}"
        logger.warning(
            "gave up posting %d bytes of events to %s after %d attempts (%s)",
            len(body),
            self.url,
            _MAX_ATTEMPTS,
            problem,
        )
        return False
