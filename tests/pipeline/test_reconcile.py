"""Nothing lost: every ambiguous send is resolved, and a stale one is never sent.

Real parts only: the warehouse (SQLite and PostgreSQL), the local SendGrid API over
HTTP, posting signed events to the real webhook app, which writes them into the
warehouse. An ambiguous send is made the way it happens in production: the answer
does not arrive in time (the sink's slow mode against a short client timeout), or the
connection drops after the request left (the sink's scripted drop).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from mailflow import ledger
from mailflow.clock import utcnow
from mailflow.metrics import rollup
from mailflow.pipeline import reconcile, resources
from mailflow.pipeline.plan import Plan, prepare
from mailflow.pipeline.send import send_batch
from mailflow.settings import get_settings
from mailflow.sink.testing import SinkHandle
from mailflow.triggers import get_trigger, registry
from mailflow.triggers.base import Trigger
from mailflow.warehouse.schema import (
    customers,
    events,
    ledger_history,
    message_facts,
    orders,
    send_ledger,
    suppressions,
)
from tests.events import hooked_sink, wait_for_events
from tests.ledger import sent_per_ledger_id
from tests.pipeline.test_stages import statuses
from tests.shop import Customer, Shopper, add_customers, add_order, build_shop

CART = get_trigger("abandoned_cart")


@pytest.fixture
def sink(warehouse_url: str) -> Iterator[SinkHandle]:
    """The local SendGrid API posting signed events to the webhook (overrides conftest's).

    Events go out every 0.5 s, after the 0.3 s client timeouts below: the webhook finds
    the rows ``unknown`` and confirms them. (Events that beat the late answer are found
    when the answer is settled; the overlap test takes that path.)"""
    quiet = {
        f"{k}_rate": 0.0 for k in ("open", "machine_open", "click", "unsubscribe", "spam", "bounce")
    }
    # Every accepted message is processed, then delivered: no random bounce or complaint
    # (which would suppress the address and make a stale re-check skip it).
    with hooked_sink(warehouse_url, event_flush_ms=500, events_seed=1, **quiet) as handle:
        yield handle


def with_settings(**changes: Any) -> resources.Resources:
    """The test's resources with some settings changed (as MAILFLOW_* would)."""
    return resources.from_settings(get_settings().model_copy(update=changes))


def plan_run(res: resources.Resources, trigger: Trigger, run: str) -> Plan:
    """Find, validate and plan one run of ``trigger`` (nothing sent yet)."""
    params = trigger.params({})
    prepared = prepare(
        res, trigger, params, utcnow(), flow_run_id=run, max_bad_share=1.0, batch_size=100
    )
    assert prepared.plan is not None
    return prepared.plan


def send_all(res: resources.Resources, trigger: Trigger, p: Plan, run: str) -> None:
    for batch in p.batches:
        asyncio.run(send_batch(res, trigger, batch, flow_run_id=run))


def history(res: resources.Resources) -> list[tuple[str, str, str]]:
    with res.engine.connect() as conn:
        rows = conn.execute(
            select(
                ledger_history.c.from_status, ledger_history.c.to_status, ledger_history.c.decision
            )
        )
        return sorted(tuple(r) for r in rows)


def carts(res: resources.Resources, n: int) -> dict[str, int]:
    return build_shop(res.engine, [Shopper(email=f"user{i}@example.com") for i in range(n)])


def test_sends_that_timed_out_are_confirmed_by_their_events(env: Any, sink: SinkHandle) -> None:
    res = with_settings(http_timeout_s=0.3)
    carts(res, 3)
    p = plan_run(res, CART, "r1")
    # SendGrid accepts each message but answers too late: the client gives up.
    sink.set_faults(slow_rate=1.0, slow_ms=1500)
    send_all(res, CART, p, "r1")
    accepted = {m["message_id"]: m for m in sink.messages()}
    assert len(accepted) == 3
    wait_for_events(sink)
    # The webhook confirmed them the moment the events arrived.
    assert statuses(res) == {"sent": 3}
    with res.engine.connect() as conn:
        rows = conn.execute(
            select(send_ledger.c.id, send_ledger.c.provider_message_id, send_ledger.c.reason)
        ).all()
    for ledger_id, message_id, reason in rows:
        assert accepted[message_id]["payload"]["personalizations"][0]["custom_args"][
            "ledger_id"
        ] == str(ledger_id)
        assert reason.startswith("confirmed by event ")
    assert history(res) == [("unknown", "sent", "confirmed")] * 3
    # Nothing was sent twice, and the next run has nothing left to resolve.
    sink.reset_faults()
    again = plan_run(res, CART, "r2")
    assert (again.batches, again.reconciled.counts()) == ([], {})
    assert sent_per_ledger_id(sink) == {str(r[0]): 1 for r in rows}


def store_event(res: resources.Resources, ledger_id: int, event: str = "delivered") -> None:
    """An event row as the webhook stores it (for a row whose webhook call was missed)."""
    now = utcnow()
    key = hashlib.sha256(f"{ledger_id}:{event}:{now}".encode()).hexdigest()
    with res.engine.begin() as conn:
        conn.execute(
            insert(events).values(
                natural_key=key,
                event=event,
                email="x@example.com",
                occurred_at=now,
                sg_message_id=f"msg{ledger_id}.filter0001",
                ledger_id=ledger_id,
                trigger=CART.name,
                raw={},
                received_at=now,
            )
        )


def test_a_missed_webhook_call_is_caught_by_the_next_run(env: Any, sink: SinkHandle) -> None:
    res = with_settings(http_timeout_s=0.3)
    carts(res, 2)
    p = plan_run(res, CART, "r1")
    # The first request gets no answer and never reached SendGrid; the second did.
    sink.set_faults(script=[{"drop": True, "count": 1}, {"status": 202, "delay_ms": 1500}])
    send_all(res, CART, p, "r1")
    wait_for_events(sink)  # the webhook confirms the accepted one
    assert statuses(res) == {"unknown": 1, "sent": 1}
    (unconfirmed,) = [i for i in sum(p.batches, []) if str(i) not in sent_per_ledger_id(sink)]
    # As if the webhook call had been missed: the event is stored, the row still unknown.
    with res.engine.begin() as conn:
        conn.execute(
            update(send_ledger).where(send_ledger.c.id != unconfirmed).values(status="unknown")
        )
    assert rollup(res.engine).messages == 0  # the analyst tables count no unknown row
    out = reconcile.resolve(res, CART.name, flow_run_id="rollup")
    assert (out.confirmed, out.resent, out.unresolved) == (1, 0, 1)
    # Confirmed, it counts as sent (on the day of its attempt), with its delivery.
    rollup(res.engine)
    with res.engine.connect() as conn:
        facts = conn.execute(select(message_facts.c.ledger_id, message_facts.c.delivered_at)).all()
    assert [f.ledger_id for f in facts] == [i for i in sum(p.batches, []) if i != unconfirmed]
    assert facts[0].delivered_at is not None


def test_a_send_no_event_names_is_sent_again_once_after_the_grace_period(
    env: Any, sink: SinkHandle
) -> None:
    res = with_settings(http_timeout_s=5.0)
    carts(res, 3)
    p = plan_run(res, CART, "r1")
    # Two connections drop after the request left: unknown. The third is accepted.
    sink.set_faults(script=[{"drop": True, "count": 2}])
    send_all(res, CART, p, "r1")
    assert statuses(res) == {"unknown": 2, "sent": 1}
    wait_for_events(sink)  # events for the accepted one: the webhook works
    assert len(sent_per_ledger_id(sink)) == 1

    # Without the webhook declared, nothing is resent and the summary says why.
    quiet = plan_run(with_settings(event_webhook=False, reconcile_grace_s=0), CART, "r2")
    assert (quiet.reconciled.resent, quiet.reconciled.unresolved) == (0, 2)
    assert quiet.reconciled.note == reconcile.NO_WEBHOOK and quiet.batches == []
    # Declared, but still within the grace period: events may yet come.
    early = plan_run(with_settings(event_webhook=True, reconcile_grace_s=3600), CART, "r3")
    assert (early.reconciled.resent, early.reconciled.note, early.batches) == (0, None, [])

    late = with_settings(event_webhook=True, reconcile_grace_s=0)
    time.sleep(0.01)
    resend = plan_run(late, CART, "r4")
    assert resend.reconciled.counts() == {"sent again (never accepted)": 2}
    send_all(late, CART, resend, "r4")
    ids = sum(p.batches, [])
    assert statuses(res) == {"sent": 3}
    assert sent_per_ledger_id(sink) == {str(i): 1 for i in ids}
    assert history(res) == [("unknown", "planned", "resend")] * 2
    # Once sent, a further run resends nothing.
    assert plan_run(late, CART, "r5").batches == []


def test_no_resend_while_no_events_arrive_at_all(env: Any, sink: SinkHandle) -> None:
    res = with_settings(event_webhook=True, reconcile_grace_s=0)
    carts(res, 2)
    p = plan_run(res, CART, "r1")
    sink.set_faults(drop_rate=1.0)
    send_all(res, CART, p, "r1")
    assert statuses(res) == {"unknown": 2}
    # No event has arrived since: the webhook itself may be what is missing.
    out = reconcile.resolve(res, CART.name, flow_run_id="r2")
    assert (out.resent, out.unresolved) == (0, 2)


def test_a_crashed_runs_claims_expire_then_resolve(env: Any, sink: SinkHandle) -> None:
    res = with_settings(claim_lease_s=60)
    carts(res, 2)
    ids = sum(plan_run(res, CART, "r1").batches, [])
    with res.engine.begin() as conn:
        ledger.claim(conn, ids, flow_run_id="crashed")
        conn.execute(update(send_ledger).values(claimed_at=utcnow() - timedelta(minutes=5)))
    # The crashed run's first message did reach SendGrid: its event names it.
    store_event(res, ids[0], "processed")
    out = reconcile.resolve(res, CART.name, flow_run_id="r2")
    assert (out.lease_expired, out.confirmed, out.unresolved) == (2, 1, 1)
    assert history(res) == [
        ("sending", "unknown", "lease_expired"),
        ("sending", "unknown", "lease_expired"),
        ("unknown", "sent", "confirmed"),
    ]


# --- stale rows: planned by one run, the condition changed, the next run must not send ---


def unsend_planned(
    res: resources.Resources, trigger: Trigger, run: str
) -> tuple[Plan, dict[str, Any]]:
    """Plan ``trigger`` as another run, send what it hands over; reasons by dedupe key."""
    p = plan_run(res, trigger, run)
    send_all(res, trigger, p, run)
    with res.engine.connect() as conn:
        rows = conn.execute(
            select(send_ledger.c.dedupe_key, send_ledger.c.status, send_ledger.c.reason)
        )
        return p, {k: (s, r) for k, s, r in rows}


def suppress(res: resources.Resources, email: str, reason: str) -> None:
    with res.engine.begin() as conn:
        conn.execute(
            insert(suppressions).values(
                email=email, reason=reason, source="test", created_at=utcnow()
            )
        )


def test_abandoned_cart_rows_whose_cart_was_bought_or_customer_left_are_not_sent(
    env: Any, sink: SinkHandle
) -> None:
    res = resources.current()
    cart_of = carts(res, 5)
    first = plan_run(res, CART, "r1")  # the run stops here (a 401, 429s, a crash)
    assert first.planned == 5
    # Meanwhile: user0 bought the cart, user1 unsubscribed, user2 withdrew consent, and
    # user3's row waited longer than a reminder may (a day).
    with res.engine.begin() as conn:
        conn.execute(
            insert(orders).values(
                id=900,
                customer_id=1,
                cart_id=cart_of["user0@example.com"],
                status="placed",
                total=10,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
        conn.execute(
            update(customers)
            .where(customers.c.email == "user2@example.com")
            .values(marketing_consent=False)
        )
        conn.execute(
            update(send_ledger)
            .where(send_ledger.c.email == "user3@example.com")
            .values(created_at=utcnow() - timedelta(days=2))
        )
    suppress(res, "user1@example.com", "unsubscribe")

    p, rows = unsend_planned(res, CART, "r2")
    assert p.reconciled.stale == {
        "skipped: no longer due": 1,
        "skipped: suppressed since it was planned": 1,
        "skipped: marketing consent withdrawn since it was planned": 1,
        "expired: too late": 1,
    }
    key = {email: f"abandoned_cart:{cid}" for email, cid in cart_of.items()}
    assert rows[key["user0@example.com"]] == ("skipped", "no longer due: " + CART.stale_reason)
    assert rows[key["user1@example.com"]][0] == "skipped"
    assert rows[key["user2@example.com"]][0] == "skipped"
    assert rows[key["user3@example.com"]][0] == "expired"
    assert rows[key["user3@example.com"]][1].startswith("too late: planned ")
    assert rows[key["user4@example.com"]][0] == "sent"
    # Only user4 reached the API.
    assert [m["payload"]["personalizations"][0]["to"][0]["email"] for m in sink.messages()] == [
        "user4@example.com"
    ]
    assert history(res).count(("planned", "skipped", "stale")) == 3


def test_order_status_rows_of_a_cancelled_order_are_not_sent(env: Any, sink: SinkHandle) -> None:
    res = resources.current()
    trigger = get_trigger("order_status")
    ids = add_customers(
        res.engine, [Customer(email="ann@example.com"), Customer(email="bob@example.com")]
    )
    ann, bob = ids.values()
    add_order(res.engine, order_id=1, customer_id=ann, changes=[("placed", 9), ("shipped", 2)])
    add_order(res.engine, order_id=2, customer_id=bob, changes=[("placed", 9), ("shipped", 2)])
    assert plan_run(res, trigger, "r1").planned == 2
    with res.engine.begin() as conn:
        conn.execute(update(orders).where(orders.c.id == 1).values(status="cancelled"))
    p, rows = unsend_planned(res, trigger, "r2")
    assert rows["order_status:1:shipped"] == ("skipped", "no longer due: " + trigger.stale_reason)
    assert rows["order_status:2:shipped"][0] == "sent"
    assert [m["payload"]["personalizations"][0]["to"][0]["email"] for m in sink.messages()] == [
        "bob@example.com"
    ]


def test_welcome_rows_of_a_bounced_address_are_not_sent(env: Any, sink: SinkHandle) -> None:
    res = resources.current()
    trigger = get_trigger("welcome")
    ids = add_customers(
        res.engine, [Customer(email="ann@example.com"), Customer(email="bob@example.com")]
    )
    assert plan_run(res, trigger, "r1").planned == 2
    suppress(res, "ann@example.com", "bounce")
    # Transactional mail ignores a marketing unsubscribe: bob's is still sent.
    suppress(res, "bob@example.com", "unsubscribe")
    p, rows = unsend_planned(res, trigger, "r2")
    assert p.reconciled.stale == {"skipped: suppressed since it was planned": 1}
    ann_id, bob_id = ids.values()
    assert rows[f"welcome:{ann_id}"] == ("skipped", "suppressed since it was planned")
    assert rows[f"welcome:{bob_id}"][0] == "sent"
    assert [m["payload"]["personalizations"][0]["to"][0]["email"] for m in sink.messages()] == [
        "bob@example.com"
    ]


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_trigger_declares_how_late_it_may_go_and_expires_what_is_later(
    env: Any, sink: SinkHandle, name: str
) -> None:
    res = resources.current()
    trigger = get_trigger(name)
    assert trigger.max_delay is not None and trigger.max_delay <= timedelta(days=7)
    now = utcnow()
    rows = [
        ledger.WaitingRow(
            1, f"{name}:late", "a@example.com", None, now - trigger.max_delay - timedelta(minutes=1)
        ),
        ledger.WaitingRow(2, f"{name}:bounced", "b@example.com", None, now),
    ]
    suppress(res, "b@example.com", "bounce")
    with res.engine.connect() as conn:
        decided = reconcile.stale_reasons(conn, trigger, rows, now=now, params=trigger.params({}))
    assert [(i, status) for i, status, _ in decided] == [(1, "expired"), (2, "skipped")]


# --- results are written while the batch is still sending ---------------------------------


def test_rows_are_claimed_and_settled_while_the_batch_is_still_sending(
    env: Any, sink: SinkHandle
) -> None:
    res = with_settings(http_concurrency=2, settle_every=1)
    carts(res, 10)
    ids = sum(plan_run(res, CART, "r1").batches, [])
    sink.set_faults(latency_ms=150)
    seen: list[dict[str, int]] = []
    sender = threading.Thread(
        target=lambda: asyncio.run(send_batch(res, CART, ids, flow_run_id="r1"))
    )
    sender.start()
    while sender.is_alive():
        seen.append(statuses(res))
        time.sleep(0.02)
    sender.join()
    # A crash at any of these moments would have left only the requests in flight
    # ambiguous (2 here), plus at most a group claimed ahead and a group being written
    # (1 each), not the whole batch.
    assert any(s.get("sent") and s.get("sending") for s in seen), seen
    assert max(s.get("sending", 0) for s in seen) <= 2 + 1 + 1, seen
    assert max(s.get("planned", 0) for s in seen) >= 5, seen  # claimed as it went
    assert statuses(res) == {"sent": 10}
