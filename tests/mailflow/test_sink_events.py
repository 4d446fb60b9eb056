"""The local SendGrid API's signed engagement events, end to end into the real webhook.

The sink posts to ``mailflow.webhook.app`` served by uvicorn on loopback, which
verifies the signatures and stores into a migrated SQLite warehouse (no mocks).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select

from mailflow.errors import ConfigError
from mailflow.sink import SinkConfig
from mailflow.sink.events import DEFAULT_CLICK_URL, EventEmitter, events_for, load_private_key
from mailflow.sink.store import record_from_payload
from mailflow.sink.testing import SinkHandle, running_sink
from mailflow.warehouse.schema import events, suppressions
from mailflow.webhook import signing
from mailflow.webhook.server import running_webhook

ADDRESSES = ("bounce1@example.com", "spam1@example.com", "unsub1@example.com", "ok1@example.com")
HTML = '<p>Your cart</p><a href="https://shop.example.com/cart/7?a=1&amp;b=2">Back to cart</a>'


def payload(email: str, ledger_id: int) -> dict[str, Any]:
    return {
        "personalizations": [
            {
                "to": [{"email": email}],
                "custom_args": {"ledger_id": str(ledger_id), "trigger": "abandoned_cart"},
            }
        ],
        "from": {"email": "shop@example.com", "name": "Example Shop"},
        "subject": "You left something behind",
        "content": [
            {"type": "text/plain", "value": "Your cart: https://shop.example.com/cart/7"},
            {"type": "text/html", "value": HTML},
        ],
        "categories": ["abandoned_cart"],
    }


def pem_keypair() -> tuple[str, str]:
    key, public_b64 = signing.generate_keypair()
    return signing.private_key_pem(key), public_b64


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def send_all(sink: SinkHandle, addresses: tuple[str, ...], first_ledger_id: int = 100) -> None:
    headers = {"authorization": f"Bearer {sink.api_key}"}
    for i, email in enumerate(addresses):
        response = sink.client.post(
            "/v3/mail/send", json=payload(email, first_ledger_id + i), headers=headers
        )
        assert response.status_code == 202, response.text


def stored(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(events).order_by(events.c.id)))


def by_email(rows: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in rows:
        out.setdefault(row.email, set()).add(row.event)
    return out


def test_events_reach_the_webhook_once_each_even_when_posted_twice(engine: Engine) -> None:
    pem, public_key = pem_keypair()
    with running_webhook(engine, public_key) as url:
        with running_sink(
            webhook_url=url,
            webhook_private_key=pem,
            duplicate_rate=1.0,
            events_seed=7,
            event_flush_ms=50,
        ) as sink:
            assert sink.webhook_public_key == public_key
            send_all(sink, ADDRESSES)

            def arrived() -> bool:
                seen = by_email(stored(engine))
                return (
                    {"processed", "delivered"} <= seen.get("ok1@example.com", set())
                    and "bounce" in seen.get("bounce1@example.com", set())
                    and "spamreport" in seen.get("spam1@example.com", set())
                    and "unsubscribe" in seen.get("unsub1@example.com", set())
                )

            wait_for(arrived, "the webhook to store the events")
            state = sink.state
            assert state is not None and state.events is not None
        # The context exit flushed everything: posted, and every batch posted again.
        counters = state.events.stats()
    assert counters["pending"] == 0 and counters["failed"] == 0
    assert counters["posted"] == counters["generated"]
    assert counters["duplicate_batches"] == counters["batches"] >= 1

    rows = stored(engine)
    assert len(rows) == counters["generated"]  # duplicates were not stored again
    assert len({r.sg_event_id for r in rows}) == len(rows)
    seen = by_email(rows)
    assert seen["bounce1@example.com"] == {"processed", "bounce"}
    assert {"processed", "delivered", "spamreport"} <= seen["spam1@example.com"]
    assert {"processed", "delivered", "open", "unsubscribe"} <= seen["unsub1@example.com"]
    ledger = {r.email: r.ledger_id for r in rows}
    assert ledger == {email: 100 + i for i, email in enumerate(ADDRESSES)}
    assert {r.trigger for r in rows} == {"abandoned_cart"}
    bounce = next(r for r in rows if r.event == "bounce")
    assert bounce.bounce_type == "bounce" and bounce.reason.startswith("550 5.1.1")
    with engine.connect() as conn:
        reasons = {r.email: r.reason for r in conn.execute(select(suppressions))}
    assert reasons == {
        "bounce1@example.com": "bounce",
        "spam1@example.com": "spamreport",
        "unsub1@example.com": "unsubscribe",
    }


def test_a_generated_key_is_served_and_verifies(engine: Engine) -> None:
    # The sink makes its own key pair; the webhook is started with the key it serves.
    with running_sink(webhook_url="http://127.0.0.1:9/unused", event_flush_ms=10) as probe:
        key = probe.webhook_public_key
        assert probe.client.get("/_sink/webhook-key").json()["public_key"] == key
        signing.load_public_key(key)  # a usable P-256 verification key
    assert "events" not in _plain_stats()

    pem, public_key = pem_keypair()
    with (
        running_webhook(engine, public_key) as url,
        running_sink(webhook_url=url, webhook_private_key=pem, event_flush_ms=10) as sink,
    ):
        send_all(sink, ("open1@example.com",), first_ledger_id=5)
        wait_for(lambda: len(stored(engine)) >= 4, "open events")
        # The sink counts a batch as posted once the webhook has answered, which is
        # after the webhook stored its events: wait for the count too.
        wait_for(lambda: sink.stats()["events"]["posted"] >= 4, "posted events counted")
        stats = sink.stats()["events"]
        assert stats["posted"] >= 4 and stats["failed"] == 0
    # Batches may arrive in either order (they are posted concurrently): by event type.
    by_event = {r.event: r for r in stored(engine)}
    assert sorted(by_event) == ["click", "delivered", "open", "processed"]
    click = by_event["click"]
    assert click.url == "https://shop.example.com/cart/7?a=1&b=2"
    raw = click.raw
    assert raw["useragent"] and raw["ip"] and raw["category"] == ["abandoned_cart"]
    assert raw["sg_message_id"].startswith(raw["smtp-id"][1:].split("@")[0] + ".")


def _plain_stats() -> dict[str, Any]:
    with running_sink() as sink:
        assert sink.client.get("/_sink/webhook-key").status_code == 400
        return sink.stats()


def test_an_unreachable_webhook_is_retried_then_counted_failed_without_blocking() -> None:
    # Port 9 (discard) on loopback is closed: every post fails at once.
    started = time.monotonic()
    with running_sink(webhook_url="http://127.0.0.1:9/events", event_flush_ms=0) as sink:
        t0 = time.monotonic()
        send_all(sink, ("ok1@example.com", "ok2@example.com"))
        assert time.monotonic() - t0 < 1.0  # mail send never waits for the webhook
        state = sink.state
        assert state is not None and state.events is not None
    counters = state.events.stats()
    assert counters["posted"] == 0
    assert counters["failed"] + counters["discarded"] == counters["generated"] > 0
    assert counters["retries"] >= 1
    assert time.monotonic() - started < 10


def test_outcomes_are_deterministic_and_carry_sendgrid_fields() -> None:
    config = SinkConfig.build(webhook_url="http://127.0.0.1:9/e", events_seed=3)
    body = orjson.dumps(
        {
            **payload("x@example.com", 1),
            "personalizations": [
                {"to": [{"email": e}], "custom_args": {"ledger_id": str(i)}}
                for i, e in enumerate(
                    ["blocked1@example.com", "drop1@example.com", "Open1@Example.com", "n@x.io"]
                )
            ],
            "custom_args": {"trigger": "browse"},
            "content": [{"type": "text/plain", "value": "no links"}],
        }
    )
    record = record_from_payload(orjson.loads(body), body, message_id="MSGID", received_ts=1e9)
    first = events_for(record, config, random.Random(3))
    second = events_for(record, config, random.Random(3))
    assert [e["event"] for e in first] == [e["event"] for e in second]
    names = {(e["email"], e["event"]) for e in first}
    assert ("blocked1@example.com", "bounce") in names
    assert ("drop1@example.com", "dropped") in names
    assert {("Open1@Example.com", n) for n in ("processed", "delivered", "open", "click")} <= names
    blocked = next(e for e in first if e["email"].startswith("blocked") and e["event"] == "bounce")
    assert blocked["type"] == "blocked"
    dropped = next(e for e in first if e["event"] == "dropped")
    assert dropped["reason"] == "Bounced Address"
    click = next(e for e in first if e["event"] == "click")
    assert click["url"] == DEFAULT_CLICK_URL
    for e in first:
        assert e["sg_message_id"].startswith("MSGID.")
        human = e["event"] in ("open", "click") and not e.get("sg_machine_open")
        # A human open comes after the delivery, a click after the open.
        assert (e["timestamp"] > 1_000_000_000) if human else (e["timestamp"] == 1_000_000_000)
        assert e["trigger"] == "browse"
        assert e["category"] == ["abandoned_cart"] and e["smtp-id"]
    assert len({e["sg_event_id"] for e in first}) == len(first)
    assert {e["ledger_id"] for e in first} == {"0", "1", "2", "3"}


def test_a_seeded_sink_gives_each_message_its_outcome_whatever_the_arrival_order() -> None:
    """Concurrent batches reach the sink in any order; a seeded sink must still bounce,
    open and unsubscribe the same messages (a shared RNG would hand the draws out by
    arrival, so which recipient bounced changed from run to run)."""
    config = SinkConfig.build(
        webhook_url="http://127.0.0.1:9/e",
        events_seed=3,
        bounce_rate=0.2,
        unsubscribe_rate=0.2,
        spam_rate=0.2,
        machine_open_rate=0.3,
    )
    records = []
    for i in range(60):
        body = orjson.dumps(payload(f"n{i}@x.io", i))
        records.append(
            record_from_payload(orjson.loads(body), body, message_id=f"M{i}", received_ts=1e9)
        )

    async def outcomes(order: list[int]) -> dict[str, list[str]]:
        heard: dict[str, list[str]] = {}
        emitter = EventEmitter(
            config, lambda email, name, _ts: heard.setdefault(email, []).append(name)
        )
        for i in order:
            emitter.on_accept(records[i])
        await emitter.aclose(timeout=0)
        return heard

    forward = asyncio.run(outcomes(list(range(60))))
    backward = asyncio.run(outcomes(list(range(59, -1, -1))))
    assert forward == backward
    # The rates are drawn, not fixed: some of each outcome, not all of them.
    bounced = [e for e, names in forward.items() if "bounce" in names]
    assert 0 < len(bounced) < 60
    assert any("unsubscribe" in names for names in forward.values())
    assert any("open" in names for names in forward.values())


def test_machine_opens_are_flagged_like_apple_mail_privacy_protection() -> None:
    config = SinkConfig.build(webhook_url="http://127.0.0.1:9/e", machine_open_rate=0.5)
    people = ["mpp1@example.com", "open1@example.com", *(f"n{i}@x.io" for i in range(200))]
    body = orjson.dumps(
        {
            **payload("x@example.com", 1),
            "personalizations": [{"to": [{"email": e}]} for e in people],
        }
    )
    record = record_from_payload(orjson.loads(body), body, message_id="M", received_ts=1e9)
    out = events_for(record, config, random.Random(1), timing=random.Random(2))
    opens = [e for e in out if e["event"] == "open"]
    machine = [e for e in opens if e["sg_machine_open"] is True]
    assert {e["email"] for e in machine} >= {"mpp1@example.com"}
    assert not [e for e in out if e["email"] == "mpp1@example.com" and e["event"] == "click"]
    assert 60 < len(machine) < 140  # about half of the delivered
    assert all(e["timestamp"] == 1_000_000_000 for e in machine)
    human = [e for e in opens if e["sg_machine_open"] is False]
    assert human and all(e["timestamp"] > 1_000_000_000 for e in human)
    # Without machine opens the outcome RNG gives what it gave before they existed.
    plain = SinkConfig.build(webhook_url="http://127.0.0.1:9/e", machine_open_rate=0.0)
    a = events_for(record, plain, random.Random(1), timing=random.Random(2))
    b = events_for(record, config, random.Random(1), timing=random.Random(2))

    def without_machine(out: list[dict[str, Any]]) -> list[str]:
        return [e["event"] for e in out if not e.get("sg_machine_open")]

    assert without_machine(a) == without_machine(b)


@pytest.mark.parametrize(
    "overrides",
    [
        {"open_rate": 1.5},
        {"event_batch_size": 0},
        {"webhook_url": "ftp://x"},
        {"webhook_private_key": "not a key"},
        {"events_seed": "x"},
    ],
)
def test_bad_event_settings_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SinkConfig.build(**overrides)


def test_a_pem_that_is_not_p256_is_refused() -> None:
    with pytest.raises(ConfigError):
        load_private_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
