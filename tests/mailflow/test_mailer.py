"""The SendGrid mailer against the local SendGrid API over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from pydantic import SecretStr

from mailflow.errors import FatalRunError
from mailflow.mailer.base import OutboundMessage, Outcome, SendResult
from mailflow.mailer.sendgrid import FatalSendError, SendGridMailer, build_payload
from mailflow.sink.validation import validate_mail_send


def message(i: int, email: str | None = None) -> OutboundMessage:
    return OutboundMessage(
        ledger_id=i,
        to_email=email or f"user{i}@example.com",
        to_name=f"User {i}",
        subject=f"Your cart {i}",
        html=f"<p>cart {i}</p>",
        text=f"cart {i}",
        categories=("abandoned_cart",),
        custom_args={"ledger_id": str(i), "trigger": "abandoned_cart"},
    )


def send(sink: Any, messages: list[OutboundMessage], **kw: Any) -> list[SendResult]:
    key = kw.pop("api_key", sink.api_key)
    mailer = SendGridMailer(
        sink.url,
        SecretStr(key),
        from_email="shop@example.com",
        from_name="Example Shop",
        backoff_base_s=0.01,
        **kw,
    )

    async def go() -> list[SendResult]:
        async with mailer:
            return await mailer.send_many(messages)

    return sorted(asyncio.run(go()), key=lambda r: r.ledger_id)


def test_payload_matches_the_official_schema() -> None:
    payload = build_payload(message(1), from_email="shop@example.com", from_name="Shop")
    assert validate_mail_send(payload) == []
    assert [c["type"] for c in payload["content"]] == ["text/plain", "text/html"]


def test_accepted_messages_carry_the_provider_id(sink: Any) -> None:
    results = send(sink, [message(i) for i in range(20)], concurrency=5)
    assert [r.outcome for r in results] == [Outcome.SENT] * 20
    ids = {r.message_id for r in results}
    assert len(ids) == 20 and None not in ids
    assert {m["message_id"] for m in sink.messages()} == ids


def test_5xx_is_retried_then_sent(sink: Any) -> None:
    sink.set_faults(script=[{"status": 503, "count": 2}, {"status": 500, "count": 1}])
    [result] = send(sink, [message(1)], max_attempts=4)
    assert result.outcome is Outcome.SENT and result.attempts == 4
    assert len(sink.messages()) == 1


def test_retries_exhausted_means_retry_later_not_failed(sink: Any) -> None:
    sink.set_faults(script=[{"status": 503, "count": 3}])
    [result] = send(sink, [message(1)], max_attempts=3)
    assert result.outcome is Outcome.RETRY
    assert "503" in (result.reason or "")
    assert sink.messages() == []


def test_429_waits_for_the_rate_limit_reset(sink: Any) -> None:
    sink.set_faults(script=[{"status": 429, "count": 1, "reset_in": 1}])
    start = time.monotonic()
    [result] = send(sink, [message(1)], max_attempts=2)
    assert result.outcome is Outcome.SENT
    assert time.monotonic() - start >= 0.5  # honoured X-RateLimit-Reset, not a 10 ms backoff


def test_400_fails_one_message_with_sendgrids_text(sink: Any) -> None:
    sink.set_faults(fail_recipients={"user2@example.com": 400})
    results = send(sink, [message(i) for i in range(4)])
    assert [r.outcome for r in results] == [
        Outcome.SENT,
        Outcome.SENT,
        Outcome.FAILED,
        Outcome.SENT,
    ]
    assert results[2].reason and results[2].reason.startswith("400")


def test_invalid_address_is_refused_by_validation(sink: Any) -> None:
    [result] = send(sink, [message(1, email="not an address")])
    assert result.outcome is Outcome.FAILED
    assert "personalizations.0.to.0.email" in (result.reason or "")


def test_401_is_fatal_and_names_the_fix(sink: Any) -> None:
    with pytest.raises(FatalSendError, match="MAILFLOW_SENDGRID_API_KEY") as info:
        send(sink, [message(i) for i in range(10)], api_key="SG.wrong")
    assert isinstance(info.value, FatalRunError)
    assert info.value.settled == []
    assert "SG.wrong" not in str(info.value)


def test_timeout_after_sending_is_unknown_and_not_resent(sink: Any) -> None:
    sink.set_faults(slow_rate=1.0, slow_ms=3000)
    [result] = send(sink, [message(1)], timeout_s=0.5, max_attempts=3)
    assert result.outcome is Outcome.UNKNOWN
    assert result.attempts == 1


def test_dropped_connection_is_unknown(sink: Any) -> None:
    sink.set_faults(drop_rate=1.0)
    [result] = send(sink, [message(1)], max_attempts=3)
    assert result.outcome is Outcome.UNKNOWN and result.attempts == 1


def test_connection_refused_is_retried_then_left_for_later() -> None:
    class Nowhere:
        url = "http://127.0.0.1:9"  # discard port: nothing listens
        api_key = "SG.x"

    [result] = send(Nowhere(), [message(1)], max_attempts=2)
    assert result.outcome is Outcome.RETRY
    assert "connection failed" in (result.reason or "")


def test_the_key_never_shows_in_repr() -> None:
    mailer = SendGridMailer("http://x", SecretStr("SG.secret"), from_email="a@example.com")
    assert "SG.secret" not in repr(mailer)


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("Doe, Jane", '"Doe, Jane"'),
        ("Ann; Bob", '"Ann; Bob"'),
        ('Say "hi", Ann', "\"Say 'hi', Ann\""),
        ("Ann\r\nBcc: evil@example.com", "Ann Bcc: evil@example.com"),
        ("  \t ", None),
        ("x" * 500, "x" * 128),
        # Names already clean are sent as they are; anything else goes through the cleanup.
        ("Ann Smith", "Ann Smith"),
        ("Zoë O'Brien-Łukasz", "Zoë O'Brien-Łukasz"),
        (" Ann  Smith ", "Ann Smith"),
        ("Ann\u00a0Smith", "Ann Smith"),
        ("Ann\x7fSmith", "Ann Smith"),
        ("", None),
    ],
)
def test_names_go_out_the_way_sendgrid_accepts_them(
    sink: Any, given: str, sent: str | None
) -> None:
    (result,) = send(sink, [dataclasses.replace(message(1), to_name=given)])
    assert result.outcome is Outcome.SENT, result.reason
    (received,) = sink.messages()
    assert received["payload"]["personalizations"][0]["to"][0].get("name") == sent


def test_the_local_api_refuses_names_sendgrid_refuses() -> None:
    payload = build_payload(message(1), from_email="shop@example.com", from_name="Shop")
    for bad in ("Doe, Jane", "Ann; Bob", "Ann\nBcc: x@example.com"):
        payload["personalizations"][0]["to"][0]["name"] = bad
        (error,) = validate_mail_send(payload)
        assert error["field"] == "personalizations.0.to.0.name"
    payload["personalizations"][0]["to"][0]["name"] = '"Doe, Jane"'
    assert validate_mail_send(payload) == []
