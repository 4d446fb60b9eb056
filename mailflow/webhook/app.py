"""The HTTP service SendGrid posts events to.

``POST /webhooks/sendgrid/events``: size limit → signature → JSON → one committed
transaction → 200. Anything answered 2xx is already committed, so SendGrid's retry
(on any non-2xx) is the only redelivery mechanism needed; storage is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from pydantic import SecretStr
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mailflow import addresses
from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.unsubscribe import InvalidToken, read_token
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import send_ledger, suppressions
from mailflow.webhook import signing
from mailflow.webhook.ingest import IngestResult, ingest

log = logging.getLogger(__name__)

EVENTS_PATH = "/webhooks/sendgrid/events"
DEFAULT_MAX_BODY_BYTES = 5_000_000
_VERIFY_OFF = (
    "SendGrid webhook signature verification is OFF: anyone can post events and create "
    "suppressions. Development only; set %s to enable it."
)


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    # Content-Length can be absent (chunked) or wrong, so count while reading too.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def create_app(
    *,
    engine: Engine,
    public_key_b64: str | None,
    verify: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tolerance_s: int = signing.DEFAULT_TOLERANCE_S,
    unsubscribe_key: SecretStr | None = None,
) -> Starlette:
    """The webhook app, writing to ``engine``.

    Raises:
        ConfigError: ``verify`` is on and the public key is missing or unusable.
    """
    public_key = None
    if verify:
        if not public_key_b64:
            raise ConfigError(
                f"{signing.PUBLIC_KEY_SETTING} is not set; paste SendGrid's Signed Event "
                "Webhook verification key, or turn verification off for local development"
            )
        public_key = signing.load_public_key(public_key_b64)
    else:
        log.warning(_VERIFY_OFF, signing.PUBLIC_KEY_SETTING)

    def store(events: list[dict[str, Any]]) -> IngestResult:
        # Committed when ingest returns, before the handler can answer 200.
        return ingest(engine, events)

    async def receive_events(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return _error(400, "bad_request", "malformed Content-Length")
            if int(declared) > max_body_bytes:
                return _error(413, "too_large", f"body over {max_body_bytes} bytes")
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return _error(413, "too_large", f"body over {max_body_bytes} bytes")
        except ClientDisconnect:
            # Nothing was stored; SendGrid retries what it did not see acknowledged.
            log.warning("webhook client disconnected before sending the whole body")
            return _error(400, "bad_request", "client disconnected mid-body")

        if public_key is None:
            log.warning(_VERIFY_OFF, signing.PUBLIC_KEY_SETTING)
        else:
            try:
                signing.verify(
                    public_key,
                    signature_b64=request.headers.get(signing.SIGNATURE_HEADER),
                    timestamp=request.headers.get(signing.TIMESTAMP_HEADER),
                    body=body,
                    tolerance_s=tolerance_s,
                )
            except signing.SignatureError as exc:
                log.warning("rejected webhook request: %s", exc)
                return _error(403, "forbidden", str(exc))

        try:
            events = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "body is not valid JSON")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return _error(400, "bad_request", "body must be a JSON array of event objects")

        try:
            result = await run_in_threadpool(store, events)
        except SQLAlchemyError:
            # Not acknowledged, so SendGrid retries; nothing is lost.
            log.exception("could not store %d webhook events", len(events))
            return _error(503, "unavailable", "could not store events; retry later")
        log.info(
            "webhook batch: received=%d stored=%d duplicates=%d suppressed=%d confirmed=%d",
            result.received,
            result.stored,
            result.duplicates,
            result.suppressed,
            result.confirmed,
        )
        if result.unusable_addresses:
            log.warning(
                "webhook batch: %d events stored without an address: their email field held "
                "a control character or whitespace, or was not text; nothing was suppressed "
                "for them (the raw event keeps what was sent)",
                result.unusable_addresses,
            )
        return JSONResponse(
            {
                "received": result.received,
                "stored": result.stored,
                "duplicates": result.duplicates,
                "confirmed": result.confirmed,
                "unusable_addresses": result.unusable_addresses,
            }
        )

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "verify": verify})

    routes = [
        Route(EVENTS_PATH, receive_events, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if unsubscribe_key is not None:
        routes += unsubscribe_routes(engine, unsubscribe_key)
    return Starlette(routes=routes)


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}
button{{font-size:1rem;padding:.6rem 1.2rem}}</style></head><body>{body}</body></html>"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=title, body=body), status_code=status)


#: One-click bodies hold one short field; anything larger is refused unread.
MAX_UNSUBSCRIBE_BODY_BYTES = 8192


async def one_click_field(request: Request) -> str | None:
    """The ``List-Unsubscribe`` field of a one-click POST, in either encoding RFC 8058
    allows (``application/x-www-form-urlencoded`` or ``multipart/form-data``, which it
    says clients SHOULD use); "" when absent, None for an oversized or unreadable body."""
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UNSUBSCRIBE_BODY_BYTES:
                return None
    except ClientDisconnect:
        log.warning("unsubscribe client disconnected before sending the whole body")
        return None

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    parser: FormParser | MultiPartParser
    if kind == "multipart/form-data":
        parser = MultiPartParser(request.headers, replay(), max_files=0, max_fields=20)
    else:
        parser = FormParser(request.headers, replay(), max_fields=20)
    try:
        form = await parser.parse()
    except (MultiPartException, ValueError):
        return None
    value = form.get("List-Unsubscribe", "")
    return value if isinstance(value, str) else None


def unsubscribe_routes(engine: Engine, key: SecretStr) -> list[Route]:
    """``GET /u/{token}`` shows a confirmation page and changes nothing (link scanners
    follow GETs); ``POST /u/{token}`` with ``List-Unsubscribe=One-Click`` (RFC 8058), or
    the page's button, suppresses the address and answers 200 without a redirect."""

    def address_of(token: str) -> tuple[int, str] | None:
        try:
            ledger_id = read_token(key, token)
        except InvalidToken:
            return None
        with engine.connect() as conn:
            email = conn.execute(
                select(send_ledger.c.email).where(send_ledger.c.id == ledger_id)
            ).scalar_one_or_none()
        return None if email is None else (ledger_id, email)

    def suppress(ledger_id: int, email: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                insert_ignoring_conflicts(conn, suppressions),
                {
                    "email": addresses.normalise(email),
                    "reason": "unsubscribe",
                    "source": f"one-click:{ledger_id}",
                    "created_at": utcnow(),
                },
            )

    async def show(request: Request) -> Response:
        found = await run_in_threadpool(address_of, request.path_params["token"])
        if found is None:
            return _page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 400)
        return _page(
            "Unsubscribe",
            "<h1>Unsubscribe?</h1><p>You will no longer receive these emails.</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>',
        )

    async def one_click(request: Request) -> Response:
        found = await run_in_threadpool(address_of, request.path_params["token"])
        if found is None:
            return _page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 400)
        field = await one_click_field(request)
        if field is None:
            return _page(
                "Unsubscribe",
                f"<p>The request body is over {MAX_UNSUBSCRIBE_BODY_BYTES} bytes or not a "
                "form (application/x-www-form-urlencoded or multipart/form-data).</p>",
                400,
            )
        if field != "One-Click":
            return _page(
                "Unsubscribe",
                "<p>Expected the form field List-Unsubscribe=One-Click.</p>",
                400,
            )
        await run_in_threadpool(suppress, *found)
        return _page("Unsubscribed", "<h1>You are unsubscribed.</h1>")

    return [
        Route("/u/{token}", show, methods=["GET"]),
        Route("/u/{token}", one_click, methods=["POST"]),
    ]
