"""The welcome flow end to end: real SQLite, Prefect's harness, real HTTP to the local API."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest

from flows.welcome import demo_run, welcome
from mailflow import watermarks
from mailflow.clock import utcnow
from mailflow.sink.validation import validate_mail_send
from mailflow.triggers.welcome import scan_from
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import suppressions
from tests.ledger import ledger_rows, sent_per_ledger_id
from tests.shop import Customer, add_customers

pytestmark = pytest.mark.usefixtures("prefect_harness")


def signups(n: int, *, start: int = 0, **kw: Any) -> list[Customer]:
    return [
        Customer(email=f"new{i}@example.com", first_name=f"New{i}", **kw)
        for i in range(start, start + n)
    ]


def stored_watermark() -> datetime | None:
    with get_engine().connect() as conn:
        return watermarks.read(conn, "welcome")


def suppress(email: str, reason: str) -> None:
    with get_engine().begin() as conn:
        conn.execute(
            suppressions.insert().values(
                email=email, reason=reason, source="test", created_at=utcnow()
            )
        )


def test_happy_path_welcomes_new_signups_once_as_transactional_mail(env, sink) -> None:
    people = signups(5)
    people += [
        Customer(email="noconsent@example.com", consent=False),  # transactional: still sent
        Customer(email="unsubscribed@example.com"),  # a marketing opt-out: still sent
        Customer(email="bounced@example.com"),  # a dead address: not sent
        Customer(email="old@example.com", signed_up_hours_ago=24 * 10),  # long before
        Customer(email="xx@example.com", locale="xx"),  # unknown locale: English, not held
    ]
    add_customers(get_engine(), people)
    suppress("unsubscribed@example.com", "unsubscribe")
    suppress("bounced@example.com", "bounce")
    before = utcnow()

    summary = welcome(batch_size=3)

    assert summary.sent == 8
    assert summary.excluded == {"suppressed": 1}
    assert summary.quarantined == {} and summary.failed == {} and summary.pending == 0
    rows = ledger_rows()
    assert {r.email for r in rows} == (
        {p.email for p in people[:5]}
        | {"noconsent@example.com", "unsubscribed@example.com", "xx@example.com"}
    )
    assert {r.status for r in rows} == {"sent"}
    assert all(r.dedupe_key == f"welcome:{r.customer_id}" for r in rows)

    accepted = sink.messages()
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})
    for m in accepted:
        payload = m["payload"]
        assert validate_mail_send(payload) == []
        assert payload["categories"] == ["welcome"]
        # Transactional: no one-click unsubscribe header and no unsubscribe link.
        assert "List-Unsubscribe" not in payload.get("headers", {})
        assert "/u/" not in payload["content"][0]["value"]
        assert "https://shop.example.com/account" in payload["content"][1]["value"]
    by_to = {m["payload"]["personalizations"][0]["to"][0]["email"]: m for m in accepted}
    assert by_to["new0@example.com"]["payload"]["subject"] == "Welcome to Example Shop, New0"
    assert by_to["xx@example.com"]["payload"]["subject"].startswith("Welcome to")

    # The watermark is the start of this clean run.
    mark = stored_watermark()
    assert mark is not None and before <= mark <= utcnow()


def test_second_run_sends_nothing_new(env, sink) -> None:
    add_customers(get_engine(), signups(6))
    first = welcome()
    second = welcome()
    assert first.sent == 6
    assert second.sent == 0 and second.planned == 0
    assert second.excluded == {"already_notified": 6}
    assert len(sink.messages()) == 6


def test_a_late_arriving_signup_inside_the_lookback_is_still_welcomed(env, sink) -> None:
    add_customers(get_engine(), signups(3))
    assert welcome().sent == 3
    mark = stored_watermark()
    assert mark is not None
    # Lands in the warehouse now, but signed up two hours before the watermark.
    add_customers(
        get_engine(), [Customer(email="late@example.com", signed_up_hours_ago=2)], first_id=50
    )

    again = welcome(lookback_hours=6)

    assert again.sent == 1
    assert again.excluded == {"already_notified": 3}
    assert [r.email for r in ledger_rows()][-1] == "late@example.com"
    assert len(sink.messages()) == 4


def test_replayed_watermark_sends_nothing_twice_and_never_moves_it_back(env, sink) -> None:
    engine = get_engine()
    add_customers(engine, signups(4, signed_up_hours_ago=30))  # before the default lookback
    add_customers(
        engine, [Customer(email="ancient@example.com", signed_up_hours_ago=24 * 5)], first_id=20
    )
    # First run without a watermark scans the lookback only: nobody is that recent.
    assert welcome().sent == 0
    first_mark = stored_watermark()

    # Replay from two days ago: the four are welcomed; 5 days is past max_age_days (3).
    replay = welcome(since=utcnow() - timedelta(days=2))
    assert replay.sent == 4
    assert "ancient@example.com" not in {r.email for r in ledger_rows()}

    # The same replay again, and a watermark put back by hand: nothing new.
    assert welcome(since=utcnow() - timedelta(days=2)).sent == 0
    with engine.begin() as conn:
        watermarks.set_watermark(conn, "welcome", utcnow() - timedelta(days=2))
    again = welcome()
    assert again.sent == 0 and again.excluded == {"already_notified": 4}
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in ledger_rows()})
    mark = stored_watermark()
    assert first_mark is not None and mark is not None and mark > first_mark


def test_overlapping_runs_welcome_each_customer_once(env, sink) -> None:
    sink.set_faults(latency_ms=20)
    add_customers(get_engine(), signups(100))
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(welcome, batch_size=10) for _ in range(2)]
        summaries = [r.result() for r in runs]

    assert sum(s.sent for s in summaries) == 100
    rows = ledger_rows()
    assert len(rows) == 100 and {r.status for r in rows} == {"sent"}
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})
    assert stored_watermark() is not None


def test_a_failed_run_leaves_the_watermark_alone(env, sink) -> None:
    from mailflow.errors import DataQualityError

    add_customers(get_engine(), signups(2) + [Customer(email=f"bad{i}") for i in range(3)])
    with pytest.raises(DataQualityError):
        welcome()
    assert stored_watermark() is None


def test_demo_hook_welcomes_the_seeded_recent_signups(env, sink) -> None:
    from mailflow.demo.seed import seed_shop

    seed_shop(get_engine(), customers=1_000, seed=3)
    first = demo_run()
    assert first.sent > 0
    assert demo_run().sent == 0


def test_scan_window_is_watermark_minus_lookback_but_never_past_max_age() -> None:
    now = datetime(2026, 3, 2, 12, 0)
    p = {"lookback_hours": 6.0, "max_age_days": 3.0}
    assert scan_from(now, {**p, "since": None}) == datetime(2026, 3, 2, 6, 0)
    assert scan_from(now, {**p, "since": datetime(2026, 3, 2, 11, 0)}) == datetime(2026, 3, 2, 5, 0)
    assert scan_from(now, {**p, "since": datetime(2025, 1, 1)}) == datetime(2026, 2, 27, 12, 0)


def test_watermark_advances_only_forward(warehouse_url: str) -> None:
    from mailflow.warehouse.engine import make_engine

    engine = make_engine(warehouse_url)
    t = datetime(2026, 3, 2, 12, 0)
    try:
        with engine.begin() as conn:
            assert watermarks.read(conn, "x") is None
            assert watermarks.advance(conn, "x", t) == t
            assert watermarks.advance(conn, "x", t - timedelta(hours=1)) == t
            assert watermarks.advance(conn, "x", t + timedelta(hours=1)) == t + timedelta(hours=1)
            watermarks.set_watermark(conn, "x", t - timedelta(days=1))
            assert watermarks.read(conn, "x") == t - timedelta(days=1)
    finally:
        engine.dispose()


def test_parameters_render_as_a_typed_form_with_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(welcome.fn).model_dump()["properties"]
    assert set(props) == {
        "lookback_hours",
        "max_age_days",
        "since",
        "batch_size",
        "max_bad_share",
        "override_guardrail",
    }
    assert all(p.get("description") for p in props.values())
