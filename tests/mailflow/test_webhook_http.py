"""The webhook service under uvicorn on a real port: SendGrid's own signed test vector, an
address that must not be repaired into another, and a client that hangs up mid-body."""

from __future__ import annotations

import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from mailflow import ledger
from mailflow.settings import Settings
from mailflow.unsubscribe import make_token
from mailflow.warehouse.schema import events, suppressions
from mailflow.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, generate_keypair, sign
from mailflow.webhook.server import running_webhook

# SendGrid's published test vector for the Signed Event Webhook (sendgrid-python,
# test/unit/test_eventwebhook.py; the same values are in sendgrid-nodejs's tests): their
# verification key, a signature made with its private half, the timestamp header and the
# exact body, trailing CRLF included. Signed in September 2020, so only a tolerance of
# years accepts it.
SENDGRID_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe6"
    "2gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SENDGRID_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15Tlu"
    "LtEZtM="
)
SENDGRID_TIMESTAMP = "1600112502"
SENDGRID_BODY = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address",'
    b'"sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",'
    b'"sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",'
    b'"smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",'
    b'"timestamp":1600112492}]\r\n'
)
VECTOR_HEADERS = {
    SIGNATURE_HEADER: SENDGRID_SIGNATURE,
    TIMESTAMP_HEADER: SENDGRID_TIMESTAMP,
    "Content-Type": "application/json",
}


def suppressed(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(suppressions.c.email, suppressions.c.reason))]


def test_sendgrids_published_vector_verifies_with_a_large_tolerance(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILFLOW_WEBHOOK_TOLERANCE_S", str(10 * 365 * 86400))
    tolerance = Settings().webhook_tolerance_s
    with running_webhook(engine, SENDGRID_PUBLIC_KEY, tolerance_s=tolerance) as url:
        accepted = httpx.post(url, content=SENDGRID_BODY, headers=VECTOR_HEADERS, timeout=10)
        tampered = httpx.post(
            url, content=SENDGRID_BODY.replace(b"hello", b"hellp"), headers=VECTOR_HEADERS
        )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["stored"] == 1
    assert tampered.status_code == 403 and "bad signature" in tampered.text
    # A "Bounced Address" drop says the address itself is bad.
    assert suppressed(engine) == [("hello@world.com", "dropped")]


def test_sendgrids_vector_is_refused_as_stale_with_the_default_tolerance(engine: Engine) -> None:
    assert Settings().webhook_tolerance_s == 300
    with running_webhook(engine, SENDGRID_PUBLIC_KEY) as url:
        refused = httpx.post(url, content=SENDGRID_BODY, headers=VECTOR_HEADERS, timeout=10)
    assert refused.status_code == 403 and "stale timestamp" in refused.text
    assert "limit 300s" in refused.text
    with engine.connect() as conn:
        assert conn.execute(select(events)).all() == []


def test_a_tolerance_outside_its_range_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILFLOW_WEBHOOK_TOLERANCE_S", "0")
    with pytest.raises(ValueError, match="webhook_tolerance_s"):
        Settings()


@pytest.mark.parametrize(
    "hostile",
    [
        "bob\x00by@example.com",  # NUL removed would be bobby@example.com, someone else
        "bob\r\nby@example.com",
        "bob by@example.com",
        "bob\u0085by@example.com",  # C1 next-line
    ],
)
def test_an_address_with_control_characters_suppresses_nobody(engine: Engine, hostile: str) -> None:
    private_key, public_b64 = generate_keypair()
    body = (
        b'[{"event":"spamreport","email":'
        + httpx.Request("POST", "http://x", json=hostile).content
        + b',"timestamp":1700000000,"sg_event_id":"nul-1"}]'
    )
    ts = str(int(time.time()))
    headers = {SIGNATURE_HEADER: sign(private_key, ts, body), TIMESTAMP_HEADER: ts}
    with running_webhook(engine, public_b64) as url:
        resp = httpx.post(url, content=body, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["unusable_addresses"] == 1
    assert suppressed(engine) == []
    with engine.connect() as conn:
        row = conn.execute(select(events.c.email, events.c.raw)).one()
    # Stored (SendGrid would redeliver a refused batch forever), without an address.
    assert row.email is None and row.raw["email"] == hostile


def _hang_up_mid_body(url: str, declared: int, sent: bytes) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
            + sent
        )


def _wait_for(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [r for r in caplog.records if text in r.getMessage()]
        if found:
            return found
        time.sleep(0.02)
    return []


@pytest.mark.parametrize("path", ["events", "unsubscribe"])
def test_a_client_hanging_up_mid_body_logs_one_line_and_no_traceback(
    engine: Engine, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    key = SecretStr("test-only-unsubscribe-secret-0123456789")
    with engine.begin() as conn:  # a real message, so the token is good and the body read
        ledger.plan(
            conn,
            "abandoned_cart",
            [ledger.PlannedMessage("abandoned_cart:1", "u1@example.com", 1, None, {})],
            flow_run_id="r",
        )
    _, public_b64 = generate_keypair()
    with (
        caplog.at_level(logging.INFO),
        running_webhook(engine, public_b64, unsubscribe_key=key) as events_url,
    ):
        base = events_url.split("/webhooks/")[0]
        url = base + "/u/" + make_token(key, 1) if path == "unsubscribe" else events_url
        _hang_up_mid_body(url, declared=5000, sent=b'[{"event":')
        lines = _wait_for(caplog, "disconnected before sending the whole body")
        assert httpx.get(base + "/healthz").is_success  # still up and answering
    assert len(lines) == 1
    assert [r for r in caplog.records if r.exc_info] == []
    assert not any("Traceback" in r.getMessage() for r in caplog.records)
    assert suppressed(engine) == []
