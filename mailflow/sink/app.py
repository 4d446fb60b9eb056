"""The local SendGrid API as a Starlette app: ``POST /v3/mail/send`` plus ``/_sink/*``.

``/v3/mail/send`` is a raw ASGI endpoint rather than a Starlette request handler:
it is the hot path of the end-to-end benchmark (thousands of requests a second
on one core), and the raw form skips building Request/Response objects. It
answers like SendGrid: 202 with ``X-Message-Id``, or SendGrid's error bodies.

Dropped connections: ASGI has no way to abort a connection, so the server
(``mailflow.sink.server``) registers each connection's transport in
``SinkState.connections`` by client address; a drop calls ``transport.abort()``
and then waits for uvicorn's ``http.disconnect``, so uvicorn sees a client that
went away (nothing logged) rather than an app that forgot to answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailflow.errors import ConfigError
from mailflow.sink.config import SinkConfig
from mailflow.sink.events import EventEmitter, fixed_outcome
from mailflow.sink.faults import FaultState, Verdict
from mailflow.sink.store import AcceptHook, MessageRecord, MessageStore, record_from_payload
from mailflow.sink.suppressions import MAX_LIMIT, PAGED_LISTS, SuppressionStore
from mailflow.sink.validation import validate_mail_send

__all__ = ["SinkState", "create_app", "sink_state"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _error_body(message: str, *, help_: object = None) -> bytes:
    return orjson.dumps({"errors": [{"message": message, "field": None, "help": help_}]})


# SendGrid's own bodies for the statuses it answers without a field.
_BODIES: dict[int, bytes] = {
    400: _error_body("Bad Request"),
    401: _error_body("The provided authorization grant is invalid, expired, or revoked"),
    403: _error_body("access forbidden"),
    404: _error_body("not found"),
    405: _error_body("method not allowed"),
    413: _error_body("content too large"),
    429: orjson.dumps({"errors": [{"field": None, "message": "too many requests"}]}),
    500: _error_body("internal server error"),
    502: _error_body("bad gateway"),
    503: _error_body("service unavailable"),
    504: _error_body("gateway timeout"),
}
_JSON = (b"content-type", b"application/json")
_NO_BODY = (b"content-length", b"0")


class SinkState:
    """Everything a running sink knows: config, store, faults, counters, connections."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.store = MessageStore(config.keep)
        self.faults = FaultState(config.faults)
        self.started = time.monotonic()
        self.requests = 0
        self.in_flight = 0
        self.dropped = 0
        self.rejected: Counter[int] = Counter()
        #: Transports by client address, filled by the server's protocol (see module doc).
        self.connections: dict[tuple[str, int], asyncio.Transport] = {}
        #: Set by that protocol: a missing transport then means the client already left.
        self.tracks_connections = False
        self._keys = {key.encode() for key in config.api_keys}
        self._forbidden = {key.encode() for key in config.forbidden_keys}
        self._pauses: set[asyncio.Future[None]] = set()
        self._stopping = False
        #: Bounces, blocks, invalid addresses, spam reports, unsubscribes (``/v3/suppression``).
        self.suppressions = SuppressionStore()
        #: Posts engagement events to ``config.webhook_url`` (None when it is not set).
        self.events: EventEmitter | None = None
        if config.webhook_url:
            self.events = EventEmitter(config, on_outcome=self.suppressions.record_outcome)
            self.add_accept_hook(self.events.on_accept)
        else:
            # No events are drawn without a webhook; the fixed outcomes still happen.
            self.add_accept_hook(self._fixed_outcomes)
        #: Accepted messages per value of ``config.count_arg`` (empty when it is unset).
        self.tally: Counter[str] = Counter()
        if config.count_arg:
            self.add_accept_hook(self._count)

    def _count(self, record: MessageRecord) -> None:
        value = record.custom_args.get(self.config.count_arg or "")
        if value is not None:
            self.tally[value] += 1

    def _fixed_outcomes(self, record: MessageRecord) -> None:
        created = int(record.received_ts)
        for email in record.recipients:
            for name in fixed_outcome(email.partition("@")[0].lower()) or ():
                self.suppressions.record_outcome(email, name, created)

    def add_accept_hook(self, hook: AcceptHook) -> None:
        """Run ``hook(record)`` after each accepted message (the future event webhook)."""
        self.store.add_hook(hook)

    def auth_status(self, header: bytes | None) -> int:
        """202 for a usable key, 403 for a key without the mail.send scope, else 401."""
        if header is None:
            return 401
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return 401
        key = key.strip()
        if key in self._forbidden:
            return 403
        return 202 if key in self._keys else 401

    async def pause(self, seconds: float) -> None:
        """Sleep without blocking the loop; cut short when the server stops."""
        if seconds <= 0 or self._stopping:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _resolve, future)
        self._pauses.add(future)
        try:
            await future
        finally:
            timer.cancel()
            self._pauses.discard(future)

    def interrupt_pauses(self) -> None:
        """End every pending latency now (at shutdown, so it does not wait for slow mode)."""
        self._stopping = True
        for future in list(self._pauses):
            _resolve(future)

    async def aclose(self) -> None:
        """Flush pending webhook events (bounded time); the server calls it at shutdown."""
        if self.events is not None:
            await self.events.aclose()

    def stats(self) -> dict[str, Any]:
        """Counters for ``GET /_sink/stats``."""
        data = {
            "accepted": self.store.accepted,
            "rejected": {str(code): n for code, n in sorted(self.rejected.items())},
            "dropped": self.dropped,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "stored": len(self.store),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        if self.events is not None:
            data["events"] = self.events.stats()
        return data


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MailSendEndpoint:
    """ASGI endpoint for ``/v3/mail/send``; see the module doc for the order of checks."""

    def __init__(self, state: SinkState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            headers = [_JSON, (b"allow", b"POST")]
            await _respond(send, 405, _BODIES[405], headers)
            return
        state = self.state
        state.requests += 1
        state.in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            state.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        auth = length = encoding = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
            elif name == b"content-encoding":
                encoding = value.lower()
        limit = state.config.max_body_bytes
        too_large = length is not None and length.isdigit() and int(length) >= limit
        body = await _read_body(receive, limit, too_large)
        if body is None:  # the client went away
            return
        delay = state.faults.delay_s()
        status = state.auth_status(auth)
        if status == 202 and body is _TOO_LARGE:
            status = 413
        if status != 202:
            await state.pause(delay)
            await self._reject(send, status)
            return
        verdict = state.faults.judge()
        delay += verdict.extra_delay_s
        if verdict.drop:
            await state.pause(delay)
            await self._drop(scope, receive, send)
            return
        if verdict.status != 202:
            await state.pause(delay)
            await self._reject(send, verdict.status, verdict.headers)
            return
        status, answer = self._accept(body, encoding, verdict)
        await state.pause(delay)
        if status != 202:
            state.rejected[status] += 1
        await _respond(send, status, *answer)

    def _accept(
        self, body: bytes, encoding: bytes | None, verdict: Verdict
    ) -> tuple[int, tuple[bytes, list[tuple[bytes, bytes]]]]:
        """Decode, validate and store one body; returns the status and (body, headers)."""
        state = self.state
        headers = [_JSON, *verdict.headers]
        if encoding == b"gzip":
            inflated = _gunzip(body, state.config.max_body_bytes)
            if inflated is _TOO_LARGE:
                return 413, (_BODIES[413], headers)
            if inflated is None:
                return 400, (_BODIES[400], headers)
            body = inflated
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if payload is None:
            return 400, (_BODIES[400], headers)
        if state.config.validate:
            errors = validate_mail_send(payload)
            if errors:
                return 400, (orjson.dumps({"errors": errors}), headers)
        fault = state.faults.recipient_fault(_recipient_fields(payload))
        if fault is not None:
            status, field = fault
            return status, (_recipient_fault_body(status, field), headers)
        message_id = secrets.token_urlsafe(16)  # 22 URL-safe characters, like SendGrid's
        state.store.add(
            record_from_payload(payload, body, message_id=message_id, received_ts=time.time())
        )
        return 202, (b"", [_NO_BODY, (b"x-message-id", message_id.encode()), *verdict.headers])

    async def _reject(
        self, send: Send, status: int, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.state.rejected[status] += 1
        body = _BODIES.get(status, _BODIES[500])
        await _respond(send, status, body, [_JSON, *(extra or ())])

    async def _drop(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        transport = self.state.connections.get(tuple(client)) if client else None
        if transport is None and self.state.tracks_connections:
            # The client gave up first (e.g. its timeout passed during a "slow" fault):
            # the connection is gone already, which is what a drop would have done.
            self.state.dropped += 1
            return
        if transport is None:
            # Not served by mailflow.sink.server (e.g. another ASGI server): answer
            # something a client also has to treat as "unknown outcome".
            logger.warning("connection drop needs mailflow.sink.server; answering 502 instead")
            await self._reject(send, 502)
            return
        self.state.dropped += 1
        transport.abort()
        while (await receive())["type"] != "http.disconnect":
            pass


_TOO_LARGE = b"<too large>"  # a sentinel, compared by identity


async def _read_body(receive: Receive, limit: int, too_large: bool) -> bytes | None:
    """The whole body; ``_TOO_LARGE`` when it reaches ``limit`` (read and discarded, so
    the client can read our 413); None when the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if not too_large:
            size += len(chunk)
            if size >= limit:
                too_large = True
                chunks.clear()
            else:
                chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if too_large:
        return _TOO_LARGE
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _gunzip(body: bytes, limit: int) -> bytes | None:
    """Inflate a gzip body; ``_TOO_LARGE`` at ``limit`` bytes, None when it is not gzip."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(body, limit)
    except zlib.error:
        return None
    if inflater.unconsumed_tail or len(data) >= limit:
        return _TOO_LARGE
    return data


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    if body:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _recipient_fields(payload: Any) -> list[tuple[str, str]]:
    pairs = []
    persons = payload.get("personalizations") if isinstance(payload, dict) else None
    for i, person in enumerate(persons if isinstance(persons, list) else ()):
        if not isinstance(person, dict):
            continue
        for kind in ("to", "cc", "bcc"):
            entries = person.get(kind)
            for j, entry in enumerate(entries if isinstance(entries, list) else ()):
                if isinstance(entry, dict) and isinstance(entry.get("email"), str):
                    pairs.append((f"personalizations.{i}.{kind}.{j}.email", entry["email"]))
    return pairs


def _recipient_fault_body(status: int, field: str) -> bytes:
    if status != 400:
        return _BODIES.get(status, _BODIES[500])
    return orjson.dumps(
        {
            "errors": [
                {
                    "message": "The recipient was refused (fail_recipients fault of the local "
                    "SendGrid API).",
                    "field": field,
                    "help": None,
                }
            ]
        }
    )


# ---------------------------------------------------------------- inspection API


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def sink_state(app: Starlette) -> SinkState:
    """The ``SinkState`` behind an app made by ``create_app``."""
    state: SinkState = app.state.sink
    return state


class _BadRequest(Exception):
    """A bad inspection request; answered 400 with the message, in SendGrid's shape."""


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > high:
        raise _BadRequest(f"{name} must be an integer from 0 to {high}, got {raw!r}.")
    return int(raw)


async def _list_messages(request: Request) -> Response:
    state = sink_state(request.app)
    records = state.store.query(
        to=request.query_params.get("to") or None,
        category=request.query_params.get("category") or None,
        limit=_int_param(request, "limit", 100, 100_000),
        offset=_int_param(request, "offset", 0, 10_000_000),
    )
    return _json([record.to_dict() for record in records])


async def _clear_messages(request: Request) -> Response:
    state = sink_state(request.app)
    state.tally.clear()
    return _json({"cleared": state.store.clear()})


async def _tally(request: Request) -> Response:
    """Messages counted per ``count_arg`` value since the last clear: how many values,
    how many messages, the values seen more than once; every value with ``?values=1``."""
    state = sink_state(request.app)
    tally = state.tally
    data: dict[str, Any] = {
        "arg": state.config.count_arg,
        "values": len(tally),
        "messages": sum(tally.values()),
        "repeated": {v: n for v, n in tally.items() if n > 1},
    }
    if request.query_params.get("values") == "1":
        data["seen"] = list(tally)
    return _json(data)


async def _get_message(request: Request) -> Response:
    record = sink_state(request.app).store.get(request.path_params["message_id"])
    if record is None:
        return Response(_BODIES[404], status_code=404, media_type="application/json")
    return _json(record.to_dict())


async def _stats(request: Request) -> Response:
    return _json(sink_state(request.app).stats())


async def _faults(request: Request) -> Response:
    faults = sink_state(request.app).faults
    if request.method == "DELETE":
        faults.reset()
    elif request.method == "POST":
        try:
            changes = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            changes = None
        if not isinstance(changes, dict):
            raise _BadRequest("The body must be a JSON object of fault settings.")
        try:
            faults.update(changes)
        except ConfigError as exc:
            raise _BadRequest(str(exc)) from None
    return _json(faults.snapshot())


async def _webhook_key(request: Request) -> Response:
    events = sink_state(request.app).events
    if events is None:
        raise _BadRequest("No webhook_url is configured, so no events are signed.")
    return _json({"public_key": events.public_key_b64, "webhook_url": events.url})


# ---------------------------------------------------------------- suppressions (/v3)


def _refusal(request: Request) -> Response | None:
    """SendGrid's 401/403 for a missing, unknown or forbidden key; None when it is usable."""
    header = request.headers.get("authorization")
    status = sink_state(request.app).auth_status(None if header is None else header.encode())
    if status == 202:
        return None
    return Response(_BODIES[status], status_code=status, media_type="application/json")


def _field_error(field: str, message: str) -> Response:
    body = orjson.dumps({"errors": [{"field": field, "message": message}]})
    return Response(body, status_code=400, media_type="application/json")


def _query_int(request: Request, name: str, low: int, high: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise _FieldError(name, f"{name} must be an integer {bound}")
    return int(raw)


class _FieldError(Exception):
    """A bad query parameter of a ``/v3`` endpoint; answered 400 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _suppression_list(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        refused = _refusal(request)
        if refused is not None:
            return refused
        try:
            limit = _query_int(request, "limit", 1, MAX_LIMIT)
            offset = _query_int(request, "offset", 0, None)
            start_time = _query_int(request, "start_time", 0, None)
            end_time = _query_int(request, "end_time", 0, None)
        except _FieldError as exc:
            return _field_error(exc.field, str(exc))
        entries = sink_state(request.app).suppressions.page(
            name,
            limit=MAX_LIMIT if limit is None else limit,
            offset=offset or 0,
            start_time=start_time,
            end_time=end_time,
            email=request.query_params.get("email") or None,
        )
        return _json(entries)

    return endpoint


async def _group_suppressions(request: Request) -> Response:
    refused = _refusal(request)
    if refused is not None:
        return refused
    return _json(sink_state(request.app).suppressions.groups())


async def _add_global(request: Request) -> Response:
    refused = _refusal(request)
    if refused is not None:
        return refused
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    emails = body.get("recipient_emails") if isinstance(body, dict) else None
    if not isinstance(emails, list) or not all(isinstance(e, str) and "@" in e for e in emails):
        return _field_error("recipient_emails", "recipient_emails must be a list of addresses")
    sink_state(request.app).suppressions.add_global(emails, int(time.time()))
    return _json({"recipient_emails": emails}, 201)


async def _sink_suppressions(request: Request) -> Response:
    store = sink_state(request.app).suppressions
    if request.method == "DELETE":
        return _json({"cleared": store.clear()})
    if request.method == "POST":
        try:
            lists = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            lists = None
        if not isinstance(lists, dict):
            raise _BadRequest("The body must map list names to addresses, e.g. {'bounces': [...]}.")
        try:
            return _json({"added": store.seed(lists, int(time.time()))})
        except ConfigError as exc:
            raise _BadRequest(str(exc)) from None
    return _json(store.counts())


async def _healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    # Routing errors (404, 405) in SendGrid's shape rather than Starlette's plain text.
    assert isinstance(exc, HTTPException)
    body = _BODIES.get(exc.status_code) or _error_body(str(exc.detail))
    return Response(
        body, status_code=exc.status_code, headers=exc.headers, media_type="application/json"
    )


async def _bad_request(request: Request, exc: Exception) -> Response:
    return Response(_error_body(str(exc)), status_code=400, media_type="application/json")


async def _server_error(request: Request, exc: Exception) -> Response:
    return Response(_BODIES[500], status_code=500, media_type="application/json")


class _SinkApp(Starlette):
    """Starlette, with the hot path taken before the middleware stack and the router:
    at thousands of requests a second their per-request cost is most of the app's."""

    def __init__(self, mail_send: MailSendEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mail_send = mail_send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and scope["path"] == "/v3/mail/send":
            await self._mail_send(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)  # type: ignore[arg-type]


def create_app(config: SinkConfig | None = None) -> Starlette:
    """The local SendGrid API for ``config`` (default: demo key, no faults).

    The ``SinkState`` is at ``app.state.sink`` (or ``sink_state(app)``); use
    ``sink_state(app).add_accept_hook(...)`` to observe accepted messages.
    """
    state = SinkState(config or SinkConfig())
    mail_send = MailSendEndpoint(state)
    routes = [
        Route("/v3/mail/send", mail_send),  # reached only under a mount or root_path
        Route("/healthz", _healthz),
        Route("/_sink/messages", _list_messages, methods=["GET"]),
        Route("/_sink/messages", _clear_messages, methods=["DELETE"]),
        Route("/_sink/messages/{message_id}", _get_message, methods=["GET"]),
        Route("/_sink/stats", _stats, methods=["GET"]),
        Route("/_sink/tally", _tally, methods=["GET"]),
        Route("/_sink/faults", _faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sink/webhook-key", _webhook_key, methods=["GET"]),
        Route("/_sink/suppressions", _sink_suppressions, methods=["GET", "POST", "DELETE"]),
        *(
            Route(f"/v3/suppression/{name}", _suppression_list(name), methods=["GET"])
            for name in PAGED_LISTS
        ),
        Route("/v3/asm/suppressions", _group_suppressions, methods=["GET"]),
        Route("/v3/asm/suppressions/global", _add_global, methods=["POST"]),
    ]
    app = _SinkApp(
        mail_send,
        routes=routes,
        exception_handlers={
            HTTPException: _http_error,
            _BadRequest: _bad_request,
            Exception: _server_error,
        },
    )
    app.state.sink = state
    return app
