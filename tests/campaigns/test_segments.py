"""Segments compile to SQLAlchemy with bound values; bad fields, operators, values refused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, inspect, select

from mailflow.campaigns.model import CampaignError, parse_campaign
from mailflow.campaigns.segments import compile_segment, parse_segment
from mailflow.clock import utcnow
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import customers
from tests.campaigns.shop import Person, add_people


def matching(segment: dict[str, Any]) -> set[str]:
    """Emails of the customers the segment selects, by running it against the warehouse."""
    expr = compile_segment(parse_segment(segment), now=utcnow())
    with get_engine().connect() as conn:
        return set(conn.execute(select(customers.c.email).where(expr)).scalars())


@pytest.fixture
def shop(env) -> None:  # type: ignore[no-untyped-def]
    add_people(
        get_engine(),
        [
            Person("de-rich@example.com", country="DE", lifetime_value="1500", ordered_days_ago=5),
            Person("de-poor@example.com", country="DE", lifetime_value="10", ordered_days_ago=200),
            Person("fr@example.com", country="FR", locale="fr", lifetime_value="300"),
            Person("us@example.com", country="US", locale="en", created_days_ago=3),
            Person("nocountry@example.com", country=None, locale="en"),  # type: ignore[arg-type]
        ],
    )


def test_filters_and_nesting_select_the_right_customers(shop) -> None:  # type: ignore[no-untyped-def]
    assert matching({"field": "country", "op": "in", "value": ["de", "FR"]}) == {
        "de-rich@example.com",
        "de-poor@example.com",
        "fr@example.com",
    }
    assert matching({"field": "lifetime_value", "op": "gte", "value": 300}) == {
        "de-rich@example.com",
        "fr@example.com",
    }
    assert matching({"field": "ordered", "op": "within_days", "value": 30}) == {
        "de-rich@example.com"
    }
    assert matching({"field": "ordered", "op": "not_within_days", "value": 30}) == {
        "de-poor@example.com",
        "fr@example.com",
        "us@example.com",
        "nocountry@example.com",
    }
    assert matching({"field": "created", "op": "within_days", "value": 7}) == {"us@example.com"}
    since = (utcnow() - timedelta(days=10)).date().isoformat()
    assert matching({"field": "created", "op": "after", "value": since}) == {"us@example.com"}
    nested = {
        "all": [
            {"field": "country", "op": "in", "value": ["DE", "FR"]},
            {
                "any": [
                    {"field": "lifetime_value", "op": "gte", "value": 1000},
                    {"field": "locale", "op": "eq", "value": "fr"},
                ]
            },
            {"not": {"field": "ordered", "op": "within_days", "value": 1}},
        ]
    }
    assert matching(nested) == {"de-rich@example.com", "fr@example.com"}
    # not_in never matches a customer without a country (SQL NULL semantics, documented).
    assert "nocountry@example.com" not in matching(
        {"field": "country", "op": "not_in", "value": ["DE"]}
    )


def test_engagement_filters_read_events_of_earlier_campaigns(shop) -> None:  # type: ignore[no-untyped-def]
    from mailflow.warehouse.schema import events, send_ledger

    now = utcnow()
    with get_engine().begin() as conn:
        ledger_id = conn.execute(
            send_ledger.insert()
            .values(
                dedupe_key="campaign:old:3",
                trigger="campaign:old",
                customer_id=3,
                email="fr@example.com",
                variant="control",
                status="sent",
                context={},
                created_at=now,
                updated_at=now,
            )
            .returning(send_ledger.c.id)
        ).scalar_one()
        conn.execute(
            events.insert().values(
                natural_key="k1",
                event="click",
                email="fr@example.com",
                occurred_at=now,
                ledger_id=ledger_id,
                trigger="campaign:old",
                raw={},
                received_at=now,
            )
        )
    assert matching({"field": "clicked_campaign", "op": "in", "value": ["old"]}) == {
        "fr@example.com"
    }
    assert matching({"field": "opened_campaign", "op": "in", "value": ["old"]}) == set()
    assert "fr@example.com" not in matching(
        {"field": "clicked_campaign", "op": "not_in", "value": ["old"]}
    )


def campaign_with(segment: Any) -> dict[str, Any]:
    return {
        "name": "t",
        "template": "campaign_spring",
        "segment": segment,
        "variants": [{"name": "a", "share": 1, "subject": "s"}],
    }


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        ({"field": "contry", "op": "in", "value": ["DE"]}, "unknown field 'contry'; valid fields: "
         "abandoned_cart, clicked_campaign, country, created, lifetime_value, locale, "
         "opened_campaign, ordered"),
        ({"field": "country", "op": "gte", "value": "DE"},
         "field 'country' has no operator 'gte'; valid operators: eq, ne, in, not_in"),
        ({"field": "lifetime_value", "op": "gte", "value": "lots"}, "expected a non-negative"),
        ({"field": "lifetime_value", "op": "gte", "value": True}, "expected a non-negative"),
        ({"field": "ordered", "op": "within_days", "value": 0}, "whole number of days"),
        ({"field": "created", "op": "before", "value": "yesterday"}, "ISO date"),
        ({"field": "country", "op": "in", "value": []}, "empty list"),
        ({"all": [], "any": []}, "at least 1 item"),
        ({"all": [{"field": "locale", "op": "eq", "value": "de"}],
          "any": [{"field": "locale", "op": "eq", "value": "de"}]}, "exactly one of"),
        ({"field": "country", "op": "in", "value": ["DE"], "sql": "1=1"}, "Extra inputs"),
    ],
)  # fmt: skip
def test_invalid_segments_are_refused_with_the_fix(segment: Any, message: str) -> None:
    with pytest.raises(CampaignError) as err:
        parse_campaign(campaign_with(segment))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "condition",
    [
        {"field": "country", "op": "in", "value": ["DE'); DROP TABLE customers; --"]},
        {"field": "country", "op": "eq", "value": "DE' OR '1'='1"},
        {"field": "locale", "op": "eq", "value": "de' OR 1=1 --"},
        {"field": "lifetime_value", "op": "gte", "value": "0 OR 1=1"},
        {"field": "opened_campaign", "op": "in", "value": ["x' UNION SELECT email FROM customers"]},
        {"field": "created", "op": "before", "value": "2025-01-01'; DELETE FROM orders; --"},
        {"field": "country; DROP TABLE customers", "op": "in", "value": ["DE"]},
        {"field": "country", "op": "in) OR (1=1", "value": ["DE"]},
    ],
)
def test_injection_attempts_are_refused_as_values(condition: dict[str, Any]) -> None:
    with pytest.raises(CampaignError):
        parse_campaign(campaign_with(condition))


def test_values_travel_as_bound_parameters_never_as_sql_text(shop) -> None:  # type: ignore[no-untyped-def]
    segment = {
        "all": [
            {"field": "country", "op": "in", "value": ["DE", "FR"]},
            {"field": "lifetime_value", "op": "between", "value": [100, "2000.5"]},
            {"field": "opened_campaign", "op": "not_in", "value": ["spring_sale"]},
        ]
    }
    expr = compile_segment(parse_segment(segment), now=utcnow())
    sql = str(select(customers.c.id).where(expr).compile(dialect=get_engine().dialect))
    for text in ("'DE'", "'FR'", "2000.5", "spring_sale"):
        assert text not in sql
    assert matching(segment) == {"de-rich@example.com", "fr@example.com"}
    with get_engine().connect() as conn:  # the shop is intact
        assert "customers" in inspect(conn).get_table_names()
        assert conn.execute(select(func.count()).select_from(customers)).scalar_one() == 5
