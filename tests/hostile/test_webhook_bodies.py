"""Hostile Event Webhook requests over HTTP to the running webhook service: refused ones
(400/403/413) store nothing; accepted ones store events and suppress exactly the
addresses their events name, never another."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func, select

from mailflow.warehouse.schema import events, suppressions
from mailflow.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, generate_keypair, sign
from mailflow.webhook.server import running_webhook
from tests.hostile.conftest import Corpus

KEY, PUBLIC = generate_keypair()
OTHER_KEY, _ = generate_keypair()


def ev(email: Any = "ok@example.com", event: Any = "bounce", n: int = 0, **extra: Any) -> dict:
    return {"email": email, "event": event, "timestamp": 1_700_000_000 + n, **extra}


def body(*items: Any) -> bytes:
    return orjson.dumps(list(items))


# (case, raw body, how it is signed, expected status, events stored, addresses suppressed)
# signing: "good", "none", "other key", "stale", "future", "tampered"
CASES: list[tuple[str, bytes, str, int, int, set[str]]] = [
    ("not JSON", b"{nope", "good", 400, 0, set()),
    ("empty body", b"", "good", 400, 0, set()),
    ("an object, not an array", b'{"email": "x@example.com"}', "good", 400, 0, set()),
    ("array of strings", b'["bounce"]', "good", 400, 0, set()),
    ("array with null", b"[null]", "good", 400, 0, set()),
    ("NaN", b'[{"timestamp": NaN}]', "good", 400, 0, set()),
    ("invalid UTF-8", b'[{"email": "\xff@example.com"}]', "good", 400, 0, set()),
    ("nested 5000 deep", b"[" * 5000 + b"]" * 5000, "good", 400, 0, set()),
    ("unsigned", body(ev()), "none", 403, 0, set()),
    ("signed by another key", body(ev()), "other key", 403, 0, set()),
    ("stale timestamp", body(ev()), "stale", 403, 0, set()),
    ("future timestamp", body(ev()), "future", 403, 0, set()),
    ("tampered after signing", body(ev()), "tampered", 403, 0, set()),
    ("over 5 MB", b"[" + b" " * 5_000_001 + b"]", "good", 413, 0, set()),
    ("empty array", b"[]", "good", 200, 0, set()),
    (
        "NUL turns into another address",
        body(ev("vic\x00tim@example.com", n=1)),
        "good",
        200,
        1,
        set(),
    ),
    ("line break in address", body(ev("a@example.com\nb@example.com", n=2)), "good", 200, 1, set()),
    ("inner space", body(ev("vic tim@example.com", n=3)), "good", 200, 1, set()),
    ("address is a number", body(ev(12345, n=4)), "good", 200, 1, set()),
    ("address is a list", body(ev(["a@example.com"], n=5)), "good", 200, 1, set()),
    ("address over 320", body(ev("a" * 400 + "@example.com", n=6)), "good", 200, 1, set()),
    (
        "upper case and spaces",
        body(ev("  Case@Example.COM ", n=7)),
        "good",
        200,
        1,
        {"case@example.com"},
    ),
    ("event is an object", body(ev(event={"x": 1}, n=8)), "good", 200, 1, set()),
    (
        "timestamp far future",
        body(ev("ts@example.com", n=9, timestamp=1e30)),
        "good",
        200,
        1,
        {"ts@example.com"},
    ),
    (
        "timestamp text",
        body(ev("tt@example.com", timestamp="soon")),
        "good",
        200,
        1,
        {"tt@example.com"},
    ),
    (
        "ledger id injection",
        body(ev("li@example.com", n=10, ledger_id="1 OR 1=1")),
        "good",
        200,
        1,
        {"li@example.com"},
    ),
    (
        "ledger id past BIGINT",
        body(ev("big@example.com", n=15, ledger_id=2**63)),
        "good",
        200,
        1,
        {"big@example.com"},
    ),
    (
        "blocked is not a bounce",
        body(ev("bl@example.com", n=11, type="blocked")),
        "good",
        200,
        1,
        set(),
    ),
    (
        "open suppresses nobody",
        body(ev("op@example.com", event="open", n=12)),
        "good",
        200,
        1,
        set(),
    ),
    (
        "same event twice",
        body(
            ev("dup@example.com", n=13, sg_event_id="d1"),
            ev("dup@example.com", n=13, sg_event_id="d1"),
        ),
        "good",
        200,
        1,
        {"dup@example.com"},
    ),
    (
        "sg_event_id 10 KB",
        body(ev("long@example.com", n=14, sg_event_id="e" * 10_000)),
        "good",
        200,
        1,
        {"long@example.com"},
    ),
]


def headers(raw: bytes, signing: str) -> dict[str, str]:
    now = int(time.time())
    ts = {"stale": now - 3600, "future": now + 3600}.get(signing, now)
    if signing == "none":
        return {"Content-Type": "application/json"}
    key = OTHER_KEY if signing == "other key" else KEY
    signed = raw.replace(b"bounce", b"spamreport") if signing == "tampered" else raw
    return {
        SIGNATURE_HEADER: sign(key, str(ts), signed),
        TIMESTAMP_HEADER: str(ts),
        "Content-Type": "application/json",
    }


def counts(engine: Engine) -> tuple[int, set[str]]:
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(events)).scalar_one()
        emails = set(conn.execute(select(suppressions.c.email)).scalars())
    return stored, emails


def raw_request(url: str, head: str) -> bytes:
    """Send a request httpx would not build (a malformed Content-Length); the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode())
        return sock.recv(4096)


@pytest.mark.category("webhook bodies")
def test_hostile_webhook_bodies(
    engine: Engine, corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    with running_webhook(engine, PUBLIC) as url, httpx.Client(timeout=30) as client:
        for name, raw, signing, status, stored, suppressed in CASES:
            before_stored, before_suppressed = counts(engine)
            response = client.post(url, content=raw, headers=headers(raw, signing))
            after_stored, after_suppressed = counts(engine)
            problems = []
            if response.status_code != status:
                problems.append(f"status {response.status_code}, expected {status}")
            if after_stored - before_stored != stored:
                problems.append(f"{after_stored - before_stored} events stored, expected {stored}")
            if after_suppressed - before_suppressed != suppressed:
                problems.append(f"suppressed {after_suppressed - before_suppressed}")
            corpus.check(name, problems)
        answer = raw_request(url, "Content-Length: 12abc\r\nContent-Type: application/json\r\n")
        corpus.check(
            "malformed Content-Length",
            [] if answer.startswith(b"HTTP/1.1 400") else [answer[:80].decode()],
        )
    # The service's log is seen here (its refusals are logged as warnings) ...
    assert any("rejected webhook request" in r.getMessage() for r in caplog.records)
    # ... and holds no traceback.
    logged = [r.getMessage()[:200] for r in caplog.records if r.exc_info]
    corpus.check("(no traceback in the service's log)", logged)
    corpus.done()
