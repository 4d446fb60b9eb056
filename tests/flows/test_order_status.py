"""The order-status flow end to end, and which suppressions stop transactional mail."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest
from sqlalchemy import func, select

from flows.order_status import demo_run, order_status
from mailflow.clock import utcnow
from mailflow.extract import MARKETING_ONLY_SUPPRESSIONS, extract
from mailflow.sink.validation import validate_mail_send
from mailflow.triggers import get_trigger
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import order_status_history, orders, suppressions
from tests.ledger import ledger_rows, sent_per_ledger_id
from tests.shop import Customer, Shopper, add_customers, add_order, add_status_changes, build_shop

pytestmark = pytest.mark.usefixtures("prefect_harness")


def suppress(email: str, reason: str) -> None:
    with get_engine().begin() as conn:
        conn.execute(
            suppressions.insert().values(
                email=email, reason=reason, source="test", created_at=utcnow()
            )
        )


def test_happy_path_one_message_per_order_and_status(env, sink) -> None:
    engine = get_engine()
    ids = add_customers(
        engine,
        [
            Customer(email="ann@example.com", first_name="Ann"),
            Customer(email="noconsent@example.com", consent=False, locale="de"),
            Customer(email="two@example.com", first_name="Two"),
        ],
    )
    ann, noconsent, two = ids.values()
    add_order(engine, order_id=101, customer_id=ann, changes=[("placed", 30), ("shipped", 2)])
    add_order(  # shipped and delivered since the last run: only "delivered" is worth saying
        engine,
        order_id=102,
        customer_id=ann,
        changes=[("placed", 50), ("shipped", 20), ("delivered", 1)],
    )
    add_order(engine, order_id=103, customer_id=noconsent, changes=[("placed", 9), ("shipped", 3)])
    add_order(engine, order_id=104, customer_id=ann, changes=[("placed", 1)])  # nothing yet
    add_order(engine, order_id=105, customer_id=ann, changes=[("placed", 200), ("shipped", 150)])
    add_order(engine, order_id=106, customer_id=ann, changes=[("placed", 5), ("cancelled", 4)])
    # Two orders of one customer shipped today: two notices, no cooldown.
    add_order(engine, order_id=107, customer_id=two, changes=[("placed", 9), ("shipped", 2)])
    add_order(engine, order_id=108, customer_id=two, changes=[("placed", 8), ("shipped", 2)])
    # A status recorded twice is one change.
    add_status_changes(engine, 107, [("shipped", 1)])

    summary = order_status(batch_size=2)

    assert summary.sent == 5
    assert summary.excluded == {} and summary.quarantined == {} and summary.failed == {}
    rows = ledger_rows()
    assert sorted(r.dedupe_key for r in rows) == [
        "order_status:101:shipped",
        "order_status:102:delivered",
        "order_status:103:shipped",
        "order_status:107:shipped",
        "order_status:108:shipped",
    ]
    assert {r.status for r in rows} == {"sent"}
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})
    subjects = {}
    for m in sink.messages():
        payload = m["payload"]
        assert validate_mail_send(payload) == []
        assert payload["categories"] == ["order_status"]
        # Transactional: no List-Unsubscribe header, no unsubscribe link.
        assert "List-Unsubscribe" not in payload.get("headers", {})
        assert "/u/" not in payload["content"][1]["value"]
        ledger_id = int(payload["personalizations"][0]["custom_args"]["ledger_id"])
        subjects[next(r.dedupe_key for r in rows if r.id == ledger_id)] = payload["subject"]
    assert subjects["order_status:101:shipped"] == "Your order #101 is on its way"
    assert subjects["order_status:102:delivered"] == "Your order #102 has been delivered"
    # Sent without marketing consent, in the customer's language.
    assert subjects["order_status:103:shipped"] == "Ihre Bestellung #103 ist unterwegs"


def test_second_run_sends_nothing_and_a_new_status_goes_once(env, sink) -> None:
    engine = get_engine()
    ids = add_customers(engine, [Customer(email=f"c{i}@example.com") for i in range(4)])
    for n, customer_id in enumerate(ids.values(), 1):
        add_order(engine, order_id=n, customer_id=customer_id, changes=[("shipped", 3)])
    assert order_status().sent == 4

    second = order_status()
    assert second.sent == 0 and second.planned == 0
    assert second.excluded == {"already_notified": 4}

    add_status_changes(engine, 2, [("delivered", 0.5)])
    third = order_status()
    assert third.sent == 1
    assert ledger_rows()[-1].dedupe_key == "order_status:2:delivered"
    assert order_status().sent == 0
    assert len(sink.messages()) == 5


def test_transactional_mail_ignores_marketing_opt_outs_but_not_dead_addresses(env, sink) -> None:
    engine = get_engine()
    reasons = ["unsubscribe", "group_unsubscribe", "bounce", "dropped", "spamreport", "manual"]
    people = [Customer(email=f"{r}@example.com") for r in reasons]
    ids = add_customers(engine, people)
    for n, customer_id in enumerate(ids.values(), 1):
        add_order(engine, order_id=n, customer_id=customer_id, changes=[("shipped", 1)])
    for reason in reasons:
        suppress(f"{reason}@example.com", reason)

    summary = order_status()

    assert summary.sent == 2
    assert summary.excluded == {"suppressed": 4}
    assert {r.email for r in ledger_rows()} == {
        f"{r}@example.com" for r in MARKETING_ONLY_SUPPRESSIONS
    }


def test_marketing_mail_honours_every_suppression(env) -> None:
    """The same rule from the marketing side: any suppression, an unsubscribe included."""
    engine = get_engine()
    reasons = ["unsubscribe", "group_unsubscribe", "bounce", "spamreport"]
    build_shop(engine, [Shopper(email=f"{r}@example.com") for r in reasons + ["fine"]])
    for reason in reasons:
        suppress(f"{reason}@example.com", reason)
    trigger = get_trigger("abandoned_cart")
    with engine.connect() as conn:
        result = extract(conn, trigger, now=utcnow(), params=trigger.params(), frequency_cap=0)
    assert result.excluded == {"suppressed": 4}
    assert result.frame["email"].tolist() == ["fine@example.com"]


def test_seeded_history_matches_the_orders_and_feeds_the_trigger(env, sink) -> None:
    from mailflow.demo.seed import seed_shop

    engine = get_engine()
    now = datetime(2026, 3, 2, 12, 0)
    stats = seed_shop(engine, customers=1_500, seed=11, now=now)
    with engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(order_status_history)).scalar_one()
            == stats.order_status_history
        )
        latest = (
            select(
                order_status_history.c.order_id,
                func.max(order_status_history.c.changed_at).label("at"),
            )
            .group_by(order_status_history.c.order_id)
            .subquery()
        )
        last_status = dict(
            conn.execute(
                select(order_status_history.c.order_id, order_status_history.c.status)
                .join(
                    latest,
                    (latest.c.order_id == order_status_history.c.order_id)
                    & (latest.c.at == order_status_history.c.changed_at),
                )
                .where(order_status_history.c.status != "placed")
            ).all()
        )
        current = dict(conn.execute(select(orders.c.id, orders.c.status)).all())
        trigger = get_trigger("order_status")
        found = extract(conn, trigger, now=now, params=trigger.params(), frequency_cap=0)
    assert last_status and all(current[o] == s for o, s in last_status.items())
    assert set(current.values()) >= {"placed", "shipped", "delivered", "cancelled"}
    assert found.found > 0
    assert set(found.frame["status"]) == {"shipped", "delivered"}


def test_demo_hook_sends_the_seeded_shipments(env, sink) -> None:
    from mailflow.demo.seed import seed_shop

    seed_shop(get_engine(), customers=1_000, seed=4)
    first = demo_run()
    assert first.sent > 0
    assert demo_run().sent == 0


def test_parameters_render_as_a_typed_form_with_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(order_status.fn).model_dump()["properties"]
    assert set(props) == {"max_age_hours", "batch_size", "max_bad_share", "override_guardrail"}
    assert all(p.get("description") for p in props.values())
