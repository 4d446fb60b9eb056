"""The SendGrid event webhook end to end: a real app in-process, a real SQLite warehouse."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, insert, select
from starlette.exceptions import StarletteDeprecationWarning

from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.warehouse.schema import events, send_ledger, suppressions
from mailflow.webhook import (
    EVENTS_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    create_app,
    generate_keypair,
    load_public_key,
    sign,
    verify,
)

# The lock pins httpx, which Starlette's TestClient still uses but announces as deprecated
# in favour of httpx2 once, at import; only that notice is silenced, everything else
# stays an error under -W error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

KEYS = generate_keypair()
OTHER_KEYS = generate_keypair()
T0 = 1_700_000_000


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(engine=engine, public_key_b64=KEYS[1], max_body_bytes=20_000)
    with TestClient(app) as c:
        yield c


def event(name: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "email": "Ada@Example.com",
        "timestamp": T0 + n,
        "event": name,
        "sg_event_id": f"evt-{name}-{n}",
        "sg_message_id": f"msg-{n}.filter0001",
        **extra,
    }


def signed_headers(
    body: bytes, *, private_key: Any = None, ts: str | None = None
) -> dict[str, str]:
    ts = ts or str(int(time.time()))
    return {
        SIGNATURE_HEADER: sign(private_key or KEYS[0], ts, body),
        TIMESTAMP_HEADER: ts,
        "Content-Type": "application/json",
    }


def post(client: TestClient, payload: list[dict[str, Any]]) -> Any:
    body = orjson.dumps(payload)
    return client.post(EVENTS_PATH, content=body, headers=signed_headers(body))


def stored(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(events).order_by(events.c.id)))


def suppressed(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.email: r.reason for r in conn.execute(select(suppressions))}


def test_a_signed_batch_is_stored_with_its_ledger_link(client: TestClient, engine: Engine) -> None:
    with engine.begin() as conn:
        now = utcnow()
        ledger_id = conn.execute(
            insert(send_ledger)
            .values(
                dedupe_key="cart:1",
                trigger="abandoned_cart",
                email="ada@example.com",
                status="sent",
                context={},
                created_at=now,
                updated_at=now,
            )
            .returning(send_ledger.c.id)
        ).scalar_one()
    payload = [
        event("delivered", 1, ledger_id=str(ledger_id), trigger="abandoned_cart"),
        event("click", 2, ledger_id=str(ledger_id), url="https://shop.example/cart"),
        event("open", 3, ledger_id="not-a-number"),
    ]
    resp = post(client, payload)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "received": 3,
        "stored": 3,
        "duplicates": 0,
        "confirmed": 0,
        "unusable_addresses": 0,
    }
    rows = stored(engine)
    assert [r.event for r in rows] == ["delivered", "click", "open"]
    assert rows[0].ledger_id == ledger_id and rows[0].trigger == "abandoned_cart"
    assert rows[0].email == "ada@example.com"
    assert rows[0].occurred_at == datetime(2023, 11, 14, 22, 13, 21)
    assert rows[1].url == "https://shop.example/cart"
    assert rows[2].ledger_id is None
    assert rows[0].raw == payload[0]


def test_tampered_body_is_refused(client: TestClient, engine: Engine) -> None:
    body = orjson.dumps([event("delivered", 1)])
    headers = signed_headers(body)
    resp = client.post(EVENTS_PATH, content=body.replace(b"delivered", b"bounce"), headers=headers)
    assert resp.status_code == 403
    assert "bad signature" in resp.json()["detail"]
    assert stored(engine) == []


def test_wrong_key_is_refused(client: TestClient) -> None:
    body = orjson.dumps([event("delivered", 1)])
    resp = client.post(
        EVENTS_PATH, content=body, headers=signed_headers(body, private_key=OTHER_KEYS[0])
    )
    assert resp.status_code == 403


def test_stale_and_future_timestamps_are_refused(client: TestClient) -> None:
    body = orjson.dumps([event("delivered", 1)])
    for ts in (int(time.time()) - 301, int(time.time()) + 600):
        resp = client.post(EVENTS_PATH, content=body, headers=signed_headers(body, ts=str(ts)))
        assert resp.status_code == 403
        assert "timestamp" in resp.json()["detail"]


def test_missing_headers_are_refused(client: TestClient) -> None:
    body = orjson.dumps([event("delivered", 1)])
    headers = signed_headers(body)
    for missing in (SIGNATURE_HEADER, TIMESTAMP_HEADER):
        partial = {k: v for k, v in headers.items() if k != missing}
        resp = client.post(EVENTS_PATH, content=body, headers=partial)
        assert resp.status_code == 403
        assert "missing" in resp.json()["detail"]


@pytest.mark.parametrize("body", [b"{not json", b'{"event": "open"}', b"[1, 2]"])
def test_malformed_json_is_a_400(client: TestClient, body: bytes) -> None:
    resp = client.post(EVENTS_PATH, content=body, headers=signed_headers(body))
    assert resp.status_code == 400


def test_too_large_is_a_413_by_header_and_while_streaming(client: TestClient) -> None:
    body = orjson.dumps([event("open", i) for i in range(200)])
    assert len(body) > 20_000
    resp = client.post(EVENTS_PATH, content=body, headers=signed_headers(body))
    assert resp.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    resp = client.post(EVENTS_PATH, content=chunks(), headers=signed_headers(body))
    assert resp.status_code == 413


def test_duplicate_deliveries_are_stored_once(client: TestClient, engine: Engine) -> None:
    first = event("delivered", 1)
    assert post(client, [first]).json() == {
        "received": 1,
        "stored": 1,
        "duplicates": 0,
        "confirmed": 0,
        "unusable_addresses": 0,
    }
    # The same event again, and the same (message, event, timestamp, email) with a new id.
    again = dict(first)
    renamed = dict(first, sg_event_id="evt-other", email="ADA@example.com")
    resp = post(client, [again, renamed, event("open", 2), event("open", 2)])
    assert resp.json() == {
        "received": 4,
        "stored": 1,
        "duplicates": 3,
        "confirmed": 0,
        "unusable_addresses": 0,
    }
    assert [r.sg_event_id for r in stored(engine)] == ["evt-delivered-1", "evt-open-2"]


def test_suppressions_follow_bounces_complaints_and_unsubscribes(
    client: TestClient, engine: Engine
) -> None:
    payload = [
        event("bounce", 1, email="hard@example.com", type="bounce", reason="550 no such user"),
        event("bounce", 2, email="blocked@example.com", type="blocked", reason="IP blocked"),
        event("spamreport", 3, email="Spam@Example.com"),
        event("unsubscribe", 4, email="unsub@example.com"),
        event("dropped", 5, email="dropped@example.com", reason="Bounced Address"),
        event("dropped", 6, email="header@example.com", reason="Invalid SMTPAPI header"),
        event("delivered", 7, email="fine@example.com"),
    ]
    assert post(client, payload).status_code == 200
    assert suppressed(engine) == {
        "hard@example.com": "bounce",
        "spam@example.com": "spamreport",
        "unsub@example.com": "unsubscribe",
        "dropped@example.com": "dropped",
    }
    with engine.connect() as conn:
        source = conn.execute(
            select(suppressions.c.source).where(suppressions.c.email == "hard@example.com")
        ).scalar_one()
        bounce_types = dict(conn.execute(select(events.c.email, events.c.bounce_type)).all())
    assert source == "event:evt-bounce-1"
    assert bounce_types["blocked@example.com"] == "blocked"


def test_group_resubscribe_lifts_only_a_group_unsubscribe(
    client: TestClient, engine: Engine
) -> None:
    post(
        client,
        [
            event("group_unsubscribe", 1, email="g@example.com", asm_group_id=7),
            event("spamreport", 2, email="s@example.com"),
        ],
    )
    assert suppressed(engine) == {
        "g@example.com": "group_unsubscribe",
        "s@example.com": "spamreport",
    }
    post(
        client,
        [
            event("group_resubscribe", 3, email="g@example.com", asm_group_id=7),
            event("group_resubscribe", 4, email="s@example.com", asm_group_id=7),
        ],
    )
    assert suppressed(engine) == {"s@example.com": "spamreport"}
    # A late redelivery of the old unsubscribe is a duplicate and does not re-suppress.
    post(client, [event("group_unsubscribe", 1, email="g@example.com", asm_group_id=7)])
    assert "g@example.com" not in suppressed(engine)


def test_a_bounce_after_an_unsubscribe_becomes_the_reason(
    client: TestClient, engine: Engine
) -> None:
    # An unsubscribe stops marketing only; a later hard bounce or complaint must stop
    # transactional mail too, so it replaces the reason. The reverse never happens.
    post(
        client,
        [
            event("unsubscribe", 1, email="u@example.com"),
            event("bounce", 2, email="u@example.com", type="bounce", reason="550 unknown user"),
            event("spamreport", 3, email="s@example.com"),
            event("unsubscribe", 4, email="s@example.com"),
            event("group_unsubscribe", 5, email="b@example.com", asm_group_id=7),
            event("bounce", 6, email="b@example.com", type="blocked", reason="try later"),
        ],
    )
    assert suppressed(engine) == {
        "u@example.com": "bounce",
        "s@example.com": "spamreport",
        "b@example.com": "group_unsubscribe",  # a block is no reason to suppress
    }


def test_unknown_event_types_are_stored_with_raw_fields(client: TestClient, engine: Engine) -> None:
    odd = event("machine_opened", 1, brand_new_field={"nested": [1, 2]}, timestamp="not-a-time")
    resp = post(client, [odd])
    assert resp.status_code == 200 and resp.json()["stored"] == 1
    (row,) = stored(engine)
    assert row.event == "machine_opened"
    assert row.raw["brand_new_field"] == {"nested": [1, 2]}
    assert row.raw == odd


def test_verification_off_accepts_unsigned_and_warns(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        app = create_app(engine=engine, public_key_b64=None, verify=False)
        with TestClient(app) as c:
            resp = c.post(EVENTS_PATH, content=orjson.dumps([event("open", 1)]))
            assert c.get("/healthz").json() == {"status": "ok", "verify": False}
    assert resp.status_code == 200
    assert sum("verification is OFF" in r.getMessage() for r in caplog.records) == 2


def test_configuration_errors_name_the_setting(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="MAILFLOW_WEBHOOK_PUBLIC_KEY"):
        load_public_key("definitely not a key")
    with pytest.raises(ConfigError, match="MAILFLOW_WEBHOOK_PUBLIC_KEY"):
        create_app(engine=engine, public_key_b64=None)


def test_verify_reports_malformed_signatures() -> None:
    key = load_public_key(KEYS[1])
    with pytest.raises(SignatureError, match="not base64"):
        verify(key, signature_b64="@@@", timestamp=str(T0), body=b"[]", now=T0)
    with pytest.raises(SignatureError, match="unix seconds"):
        verify(key, signature_b64="AAAA", timestamp="yesterday", body=b"[]", now=T0)
    good = sign(KEYS[0], str(T0), b"[]")
    verify(key, signature_b64=good, timestamp=str(T0), body=b"[]", now=T0)
