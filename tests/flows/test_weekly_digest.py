"""The weekly digest: which timezones are due (pure), and the flow end to end."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from flows.weekly_digest import demo_run, weekly_digest
from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.settings import get_settings
from mailflow.sink.validation import validate_mail_send
from mailflow.triggers.weekly_digest import WEEKDAYS, due_timezones, invalid_timezones
from mailflow.unsubscribe import unsubscribe_url
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import customers, send_ledger, suppressions
from tests.ledger import ledger_rows, sent_per_ledger_id
from tests.shop import Customer, Shopper, add_customers, build_shop

pytestmark = pytest.mark.usefixtures("prefect_harness")


def slot_now(zone: str) -> dict[str, Any]:
    """Parameters that make the slot start this hour in ``zone``.

    ``window_hours=2`` keeps the zone due if the hour turns while the test runs; the zones
    the tests expect *not* to be due are many hours away.
    """
    local = datetime.now(UTC).astimezone(ZoneInfo(zone))
    return {"weekday": WEEKDAYS[local.weekday()], "hour": local.hour, "window_hours": 2}


def week_of(zone: str) -> str:
    """The ISO week of the slot that started this hour in ``zone``."""
    year, week, _ = datetime.now(UTC).astimezone(ZoneInfo(zone)).isocalendar()
    return f"{year}-W{week:02d}"


# --- which timezones are due ---------------------------------------------------------------


def test_a_zone_is_due_at_its_local_slot_through_dst_and_odd_offsets() -> None:
    monday_9 = {"weekday": "monday", "hour": 9}
    # Monday 30 Nov 2026, winter: 08:00 UTC is 09:00 in Berlin (CET), 08:00 in London.
    due = due_timezones(datetime(2026, 11, 30, 8, 0), **monday_9)
    assert due["Europe/Berlin"] == "2026-W49" and due["Europe/Paris"] == "2026-W49"
    assert "Europe/London" not in due and "America/New_York" not in due
    assert "UTC" not in due
    # 14:00 UTC is 09:00 in New York (EST); 59 minutes later it still is, 60 not.
    assert "America/New_York" in due_timezones(datetime(2026, 11, 30, 14, 0), **monday_9)
    assert "America/New_York" in due_timezones(datetime(2026, 11, 30, 14, 59), **monday_9)
    assert "America/New_York" not in due_timezones(datetime(2026, 11, 30, 15, 0), **monday_9)
    # Summer (CEST, UTC+2): Berlin's 09:00 is 07:00 UTC.
    summer = due_timezones(datetime(2026, 6, 29, 7, 0), **monday_9)
    assert "Europe/Berlin" in summer and "Europe/London" not in summer
    # Half-hour offsets: Kolkata is UTC+05:30.
    assert "Asia/Kolkata" in due_timezones(datetime(2026, 11, 30, 3, 30), **monday_9)
    assert "Asia/Kolkata" not in due_timezones(datetime(2026, 11, 30, 3, 29), **monday_9)
    # An aware instant is the same instant.
    aware = datetime(2026, 11, 30, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert "Europe/Berlin" in due_timezones(aware, **monday_9)


def test_the_week_is_the_local_iso_week_of_the_slot() -> None:
    # Monday 30 Dec 2024 is in ISO week 1 of 2025.
    assert due_timezones(datetime(2024, 12, 30, 9, 0), weekday="monday", hour=9)["UTC"] == (
        "2025-W01"
    )
    # A window that runs past Sunday midnight keeps the slot's week.
    late = due_timezones(datetime(2026, 11, 30, 0, 30), weekday="sunday", hour=23, window_hours=2)
    assert late["UTC"] == "2026-W48"
    # Tokyo is already Monday 09:30 then, but its Sunday 23:00 slot is long past.
    assert "Asia/Tokyo" not in late


def test_bad_slot_parameters_are_refused_with_the_field_named() -> None:
    now = datetime(2026, 11, 30, 8, 0)
    with pytest.raises(ConfigError, match="weekday 'mon'.*monday"):
        due_timezones(now, weekday="mon", hour=9)
    with pytest.raises(ConfigError, match="hour 24"):
        due_timezones(now, weekday="monday", hour=24)
    with pytest.raises(ConfigError, match="window_hours 0"):
        due_timezones(now, weekday="monday", hour=9, window_hours=0)


# --- the flow ---------------------------------------------------------------------------------


def test_digest_goes_only_to_due_timezones_once_a_week(env, sink) -> None:
    people = [
        Customer(email="tokyo1@example.com", first_name="Yui", timezone="Asia/Tokyo"),
        Customer(email="tokyo2@example.com", timezone="Asia/Tokyo", locale="de"),
        Customer(email="seoul@example.com", timezone="Asia/Seoul"),  # same local time
        Customer(email="tokyo-noconsent@example.com", timezone="Asia/Tokyo", consent=False),
        Customer(email="tokyo-unsub@example.com", timezone="Asia/Tokyo"),
        Customer(email="newyork@example.com", timezone="America/New_York"),
        Customer(email="london@example.com", timezone="Europe/London"),
        Customer(email="utc@example.com", timezone="UTC"),
        Customer(email="invalid@example.com", timezone="Mars/Olympus"),  # as UTC: not due
    ]
    ids = add_customers(get_engine(), people, first_id=1)
    with get_engine().begin() as conn:
        conn.execute(
            suppressions.insert().values(
                email="tokyo-unsub@example.com",
                reason="unsubscribe",
                source="test",
                created_at=utcnow(),
            )
        )

    summary = weekly_digest(**slot_now("Asia/Tokyo"))

    assert summary.sent == 3
    assert summary.found == 5
    assert summary.excluded == {"no_consent": 1, "suppressed": 1}
    rows = ledger_rows()
    assert {r.email for r in rows} == {
        "tokyo1@example.com",
        "tokyo2@example.com",
        "seoul@example.com",
    }
    week = week_of("Asia/Tokyo")
    assert sorted(r.dedupe_key for r in rows) == sorted(
        f"weekly_digest:{ids[r.email]}:{week}" for r in rows
    )
    settings = get_settings()
    for m in sink.messages():
        payload = m["payload"]
        assert validate_mail_send(payload) == []
        assert payload["categories"] == ["weekly_digest"]
        # Marketing: RFC 8058 one-click unsubscribe, and the same link in the body.
        ledger_id = int(payload["personalizations"][0]["custom_args"]["ledger_id"])
        link = unsubscribe_url(settings.unsubscribe_base_url, settings.unsubscribe_key(), ledger_id)
        assert payload["headers"]["List-Unsubscribe"] == f"<{link}>"
        assert link in payload["content"][1]["value"]
    subjects = {m["payload"]["subject"] for m in sink.messages()}
    assert "Yui, your weekly picks from Example Shop" in subjects
    assert "Ann, Ihre Empfehlungen der Woche von Example Shop" in subjects

    again = weekly_digest(**slot_now("Asia/Tokyo"))
    assert again.sent == 0 and again.excluded.get("already_notified") == 3
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in ledger_rows()})


def test_invalid_timezones_are_sent_at_the_utc_slot(env, sink) -> None:
    people = [
        Customer(email="utc@example.com", timezone="UTC"),
        Customer(email="mars@example.com", timezone="Mars/Olympus"),
        Customer(email="blank@example.com", timezone=""),
        Customer(email="lower@example.com", timezone="europe/berlin"),
        Customer(email="tokyo@example.com", timezone="Asia/Tokyo"),
    ]
    add_customers(get_engine(), people)
    with get_engine().connect() as conn:
        assert invalid_timezones(conn) == {"": 1, "Mars/Olympus": 1, "europe/berlin": 1}

    summary = weekly_digest(**slot_now("UTC"))

    assert summary.sent == 4
    assert {r.email for r in ledger_rows()} == {
        "utc@example.com",
        "mars@example.com",
        "blank@example.com",
        "lower@example.com",
    }
    assert all(r.dedupe_key.endswith(f":{week_of('UTC')}") for r in ledger_rows())


def test_digest_shows_the_open_cart_and_picks(env, sink) -> None:
    engine = get_engine()
    build_shop(
        engine,
        [
            Shopper(email="cart@example.com", first_name="Cara", items=[(1, 2, "19.90")]),
            Shopper(email="ordered@example.com", ordered=True, items=[(2, 1, "19.90")]),
            # Past open_cart_days: no longer shown as open.
            Shopper(email="stale@example.com", idle_hours=24 * 30, items=[(3, 1, "19.90")]),
        ],
    )

    # build_shop's customers live in UTC.
    summary = weekly_digest(**slot_now("UTC"))

    assert summary.sent == 3
    by_to = {
        m["payload"]["personalizations"][0]["to"][0]["email"]: m["payload"] for m in sink.messages()
    }
    with_cart = by_to["cart@example.com"]["content"]
    assert "Still in your cart" in with_cart[0]["value"]
    assert "https://shop.example.com/cart/1" in with_cart[1]["value"]
    # Product 1 is in Cara's cart, so it is not one of her picks; products 2 and 3 are.
    assert "/products/1" not in with_cart[1]["value"]
    assert "/products/2" in with_cart[1]["value"] or "/products/3" in with_cart[1]["value"]
    for other in ("ordered@example.com", "stale@example.com"):
        text = by_to[other]["content"][0]["value"]
        assert "Still in your cart" not in text and "https://shop.example.com" in text


def test_demo_hook_sends_to_the_zone_it_names(env, sink) -> None:
    from mailflow.demo.seed import seed_shop

    seed_shop(get_engine(), customers=1_000, seed=5)
    first = demo_run(timezone="Europe/Berlin")
    assert first.sent > 0
    with get_engine().connect() as conn:
        zones = {
            z
            for (z,) in conn.execute(
                select(customers.c.timezone)
                .join(send_ledger, send_ledger.c.customer_id == customers.c.id)
                .distinct()
            )
        }
    assert "Europe/Berlin" in zones and "America/New_York" not in zones
    assert demo_run(timezone="Europe/Berlin").sent == 0


def test_parameters_render_as_a_typed_form_with_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(weekly_digest.fn).model_dump()["properties"]
    assert set(props) == {
        "weekday",
        "hour",
        "window_hours",
        "open_cart_days",
        "batch_size",
        "max_bad_share",
        "override_guardrail",
    }
    assert all(p.get("description") for p in props.values())
    assert props["hour"]["maximum"] == 23
