"""The SendGrid v3 implementation of the mailer (``POST /v3/mail/send``).

Why not the official ``sendgrid`` client: it opens a new connection per request,
has no timeout by default and is synchronous (~19 msg/s here at 50 ms latency).
This one keeps pooled keep-alive connections and runs many requests at once.

How answers are classified (SendGrid has no idempotency key, so a request that
may have reached it is never sent again blindly):

===============================  ==========================================
202                              sent, with ``X-Message-Id``
400 (and other 4xx but 401/403)  failed for good, with SendGrid's error text
401 / 403                        ``FatalRunError``: the run stops at once
429                              retried after ``X-RateLimit-Reset``
5xx, refused/failed connect      retried with exponential backoff and jitter
timeout after the request left   unknown: may have been delivered; reconciled by events
connection dropped mid-request   unknown, for the same reason
===============================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr
from yarl import URL

from mailflow import __version__
from mailflow.errors import FatalRunError
from mailflow.mailer.base import OutboundMessage, Outcome, SendResult

log = logging.getLogger(__name__)

SEND_PATH = "/v3/mail/send"


class FatalSendError(FatalRunError):
    """SendGrid refused the credentials; ``settled`` is what was answered before that.

    Callers catch :class:`mailflow.errors.FatalRunError`, the category.
    """


#: Display names are cut to this many characters (SendGrid documents no limit; a name
#: this long is a data error, and header lines should stay short).
MAX_NAME_CHARS = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def display_name(value: str | None) -> str | None:
    """A recipient or sender name as SendGrid accepts it, or None when nothing is left.

    Control characters (CR/LF would break the header) become spaces, runs of spaces
    collapse, the result is cut to :data:`MAX_NAME_CHARS`; a name with ``,`` or ``;``
    is quoted (SendGrid splits an unquoted one into several addresses and refuses it —
    the workaround sendgrid-python applies too), with inner ``"`` made ``'``.
    """
    if value is None:
        return None
    if (
        len(value) <= MAX_NAME_CHARS
        and value.isprintable()  # no control characters, no whitespace but " "
        and "  " not in value
        and "," not in value
        and ";" not in value
        and value.strip() == value
    ):
        return value or None  # already what the steps below would make of it
    name = " ".join(_CONTROL.sub(" ", value).split())[:MAX_NAME_CHARS].strip()
    if not name:
        return None
    if "," in name or ";" in name:
        name = '"' + name.replace('"', "'") + '"'
    return name


def sender_object(from_email: str, from_name: str | None) -> dict[str, str]:
    """The ``from`` object of every payload for this sender."""
    sender: dict[str, str] = {"email": from_email}
    if name := display_name(from_name):
        sender["name"] = name
    return sender


def build_payload(
    msg: OutboundMessage,
    *,
    from_email: str,
    from_name: str | None,
    sender: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The ``/v3/mail/send`` body for one message (one personalization, one recipient).

    ``sender``: the ``from`` object made once by :func:`sender_object` (a mailer sends
    thousands of payloads for one sender); None makes it from ``from_email``/``from_name``.
    """
    to: dict[str, str] = {"email": msg.to_email}
    if name := display_name(msg.to_name):
        to["name"] = name
    if sender is None:
        sender = sender_object(from_email, from_name)
    personalization: dict[str, Any] = {"to": [to]}
    if msg.custom_args:
        personalization["custom_args"] = msg.custom_args
    payload: dict[str, Any] = {
        "personalizations": [personalization],
        "from": sender,
        "subject": msg.subject,
        # SendGrid requires text/plain first when both parts are present.
        "content": [
            {"type": "text/plain", "value": msg.text},
            {"type": "text/html", "value": msg.html},
        ],
    }
    if msg.categories:
        payload["categories"] = list(msg.categories)
    if msg.headers:
        payload["headers"] = msg.headers
    if msg.send_at is not None:
        payload["send_at"] = msg.send_at
    return payload


def _error_text(body: bytes) -> str:
    """SendGrid's error body as one line: ``field: message; field: message``."""
    try:
        data = orjson.loads(body)
        parts = []
        for err in data.get("errors", []):
            field = err.get("field")
            message = err.get("message") or "error"
            parts.append(f"{field}: {message}" if field else str(message))
        if parts:
            return "; ".join(parts)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    return body[:300].decode("utf-8", "replace") or "no error body"


class SendGridMailer:
    """Sends through SendGrid's v3 API (or the local stand-in at another host).

    Args:
        host: base URL, e.g. ``https://api.sendgrid.com``.
        api_key: the key; only ever placed in the Authorization header.
        concurrency: requests in flight at once per ``send_many`` call.
        pool_size: connections kept open at most (default ``concurrency``; 0: no bound,
            for a mailer several batches share, each bounded by ``concurrency``).
        timeout_s: total time allowed per request.
        max_attempts: tries per message for retryable answers before giving up
            with ``Outcome.RETRY`` (the caller may try again later).
    """

    def __init__(
        self,
        host: str,
        api_key: SecretStr,
        *,
        from_email: str,
        from_name: str | None = None,
        concurrency: int = 100,
        pool_size: int | None = None,
        timeout_s: float = 15.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 20.0,
    ) -> None:
        # Parsed once: aiohttp parses a str URL again on every request.
        self._url = URL(host.rstrip("/") + SEND_PATH)
        self._api_key = api_key
        self._from_email = from_email
        self._from_name = from_name
        self._sender = sender_object(from_email, from_name)
        self._concurrency = concurrency
        self._pool_size = concurrency if pool_size is None else pool_size
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the key
        return f"SendGridMailer(url={str(self._url)!r})"

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={
                    "Authorization": f"Bearer {self._api_key.get_secret_value()}",
                    "Content-Type": "application/json",
                    "User-Agent": f"mailflow/{__version__}",
                },
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> SendGridMailer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads the retries of a whole batch instead of synchronising them.
        return random.uniform(0, min(self._backoff_max, self._backoff_base * 2**attempt))

    @staticmethod
    def _rate_limit_wait(headers: Any, fallback: float, cap: float) -> float:
        reset = headers.get("X-RateLimit-Reset")
        if reset is not None:
            try:
                return min(cap, max(0.0, float(reset) - time.time()) + random.uniform(0, 0.1))
            except ValueError:
                pass
        return fallback

    async def send_many(
        self,
        messages: Iterable[OutboundMessage] | AsyncIterable[OutboundMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]:
        """Send every message; one result each, also handed to ``on_result`` as it comes.

        ``concurrency`` workers each take the next message when they are free, so an
        async iterable is drawn from only as fast as requests can go out (the send stage
        claims its rows that way, a few at a time). Raises ``FatalSendError`` on 401/403.
        """
        session = await self._get_session()
        settled: list[SendResult] = []
        if isinstance(messages, AsyncIterable):
            source = aiter(messages)
            draw = asyncio.Lock()  # one worker at a time advances the source

            async def take() -> OutboundMessage | None:
                async with draw:
                    return await anext(source, None)
        else:
            plain = iter(messages)

            async def take() -> OutboundMessage | None:
                return next(plain, None)  # no await: no other worker runs meanwhile

        async def worker() -> None:
            while True:
                msg = await take()
                if msg is None:
                    return
                result = await self._send_one(session, msg)
                settled.append(result)
                if on_result is not None:
                    on_result(result)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._concurrency):
                    group.create_task(worker())
        except* FatalSendError as eg:
            first = eg.exceptions[0]
            assert isinstance(first, FatalSendError)
            raise FatalSendError(str(first), settled) from None
        return settled

    async def _send_one(self, session: aiohttp.ClientSession, msg: OutboundMessage) -> SendResult:
        body = orjson.dumps(
            build_payload(
                msg, from_email=self._from_email, from_name=self._from_name, sender=self._sender
            )
        )
        reason = ""
        status: int | None = None
        for attempt in range(1, self._max_attempts + 1):
            wait = 0.0
            try:
                async with session.post(self._url, data=body) as resp:
                    status = resp.status
                    if status == 202:
                        return SendResult(
                            msg.ledger_id,
                            Outcome.SENT,
                            message_id=resp.headers.get("X-Message-Id"),
                            status_code=202,
                            attempts=attempt,
                        )
                    raw = await resp.read()
                    if status in (401, 403):
                        raise FatalSendError(
                            f"SendGrid refused the API key ({status}: {_error_text(raw)}). "
                            "Check MAILFLOW_SENDGRID_API_KEY (or the Secret block) and that "
                            "the key has the mail.send permission. Nothing more is sent.",
                            [],
                        )
                    if status == 429:
                        reason = "429 rate limited"
                        wait = self._rate_limit_wait(
                            resp.headers, self._backoff(attempt), self._backoff_max
                        )
                    elif status >= 500:
                        reason = f"{status} {_error_text(raw)}"
                        wait = self._backoff(attempt)
                    else:
                        return SendResult(
                            msg.ledger_id,
                            Outcome.FAILED,
                            status_code=status,
                            reason=f"{status} {_error_text(raw)}",
                            attempts=attempt,
                        )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never connected: the request cannot have reached SendGrid.
                status = None
                reason = f"connection failed: {type(exc).__name__}"
                wait = self._backoff(attempt)
            except (TimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # The request left; SendGrid may have accepted it. Without an idempotency
                # key a resend could deliver twice, so the outcome is unknown.
                return SendResult(
                    msg.ledger_id,
                    Outcome.UNKNOWN,
                    reason=f"no answer after the request was sent ({type(exc).__name__}); "
                    "unknown until a provider event confirms it (or the grace period ends)",
                    attempts=attempt,
                )
            if attempt < self._max_attempts:
                await asyncio.sleep(wait)
        return SendResult(
            msg.ledger_id,
            Outcome.RETRY,
            status_code=status,
            reason=f"gave up after {self._max_attempts} attempts: {reason}",
            attempts=self._max_attempts,
        )
