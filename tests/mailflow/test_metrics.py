"""The engagement rollup against a recomputation from the raw rows, done here by hand.

Sends, events (through the real ingest path, duplicates included) and orders are
generated at random; the test then adds up the same numbers in plain Python and
compares them with ``mf_metrics_daily`` and ``mf_message_facts``, after a full run,
after incremental runs and after a rerun.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text

from mailflow.clock import utcnow
from mailflow.metrics import DEFAULT_VARIANT, LATE_ORDERS, rollup
from mailflow.report import COUNTS as COUNT_COLUMNS
from mailflow.warehouse.schema import (
    customers,
    events,
    message_facts,
    metrics_daily,
    orders,
    send_ledger,
)
from mailflow.webhook.ingest import store_events

WINDOW = timedelta(hours=72)
# Sends over the last week, so that recent orders fall in the attribution window.
T0 = (utcnow() - timedelta(days=6)).replace(minute=0, second=0, microsecond=0)


class World:
    """Random sends, events and orders, remembered for the hand recomputation."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.messages: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.orders: list[dict[str, Any]] = []
        self.next_customer = 1
        self.next_ledger = 1
        self.next_order = 1
        self.next_event = 1

    def customers(self, n: int) -> list[int]:
        ids = list(range(self.next_customer, self.next_customer + n))
        self.next_customer += n
        with self.engine.begin() as conn:
            conn.execute(
                insert(customers),
                [{"id": i, "email": f"c{i}@example.com", "created_at": T0} for i in ids],
            )
        return ids

    def send(self, customer_ids: list[int], trigger: str, *, start: datetime) -> list[int]:
        rows = []
        for cid in customer_ids:
            lid = self.next_ledger
            self.next_ledger += 1
            # Unique, spread-out send times: ties would make last touch ambiguous.
            sent_at = start + timedelta(minutes=37 * lid % 4000, seconds=lid)
            variant = self.rng.choice([None, "vip"])
            row = {
                "id": lid,
                "dedupe_key": f"{trigger}:{lid}",
                "trigger": trigger,
                "customer_id": cid,
                "email": f"c{cid}@example.com",
                "variant": variant,
                "status": "sent",
                "context": {},
                "created_at": sent_at,
                "updated_at": utcnow(),  # the row is written now, whatever its send time
                "sent_at": sent_at,
            }
            rows.append(row)
            self.messages[lid] = row
        # A row that was never sent must not show up anywhere.
        failed = dict(
            rows[0], id=self.next_ledger, dedupe_key=f"{trigger}:failed:{self.next_ledger}"
        )
        failed.update(status="failed", sent_at=None)
        self.next_ledger += 1
        with self.engine.begin() as conn:
            conn.execute(insert(send_ledger), [*rows, failed])
        return [r["id"] for r in rows]

    def _event(self, lid: int, name: str, at: datetime, **extra: Any) -> dict[str, Any]:
        msg = self.messages[lid]
        ev = {
            "sg_event_id": f"ev-{self.next_event}",
            "event": name,
            "email": msg["email"],
            "timestamp": int((at - datetime(1970, 1, 1)).total_seconds()),
            "sg_message_id": f"msg-{lid}.filter",
            "ledger_id": str(lid),
            "trigger": msg["trigger"],
            **extra,
        }
        self.next_event += 1
        return ev

    def engage(self, ledger_ids: list[int]) -> None:
        rng = self.rng
        batch: list[dict[str, Any]] = []
        for lid in ledger_ids:
            at = self.messages[lid]["sent_at"] + timedelta(seconds=5)
            batch.append(self._event(lid, "processed", at))
            fate = rng.random()
            if fate < 0.05:
                batch.append(self._event(lid, "bounce", at, type="bounce", reason="550 no"))
                continue
            if fate < 0.08:
                batch.append(self._event(lid, "bounce", at, type="blocked", reason="blocked"))
                continue
            if fate < 0.10:
                batch.append(self._event(lid, "dropped", at, reason="Bounced Address"))
                continue
            if rng.random() < 0.1:
                batch.append(self._event(lid, "deferred", at, response="try later"))
            if rng.random() < 0.95:  # else lost: an open or a click proves delivery
                batch.append(self._event(lid, "delivered", at + timedelta(seconds=30)))
            if rng.random() < 0.3:  # Apple Mail Privacy Protection fetches the pixel
                batch.append(
                    self._event(lid, "open", at + timedelta(seconds=31), sg_machine_open=True)
                )
            for k in range(rng.choice([0, 0, 1, 2, 3])):
                batch.append(
                    self._event(lid, "open", at + timedelta(minutes=10 + k), sg_machine_open=False)
                )
            for k in range(rng.choice([0, 0, 0, 1, 2])):
                batch.append(
                    self._event(lid, "click", at + timedelta(minutes=20 + k), url="https://x/y")
                )
            if rng.random() < 0.03:
                batch.append(self._event(lid, "unsubscribe", at + timedelta(hours=1)))
            if rng.random() < 0.02:
                batch.append(self._event(lid, "spamreport", at + timedelta(hours=2)))
        # SendGrid delivers at least once: a tenth of the batch arrives again.
        batch += rng.sample(batch, len(batch) // 10)
        with self.engine.begin() as conn:
            store_events(conn, batch)
        self.events.extend(batch)

    def late_engagement(self, ledger_ids: list[int], *, days: int) -> None:
        """Opens and clicks that arrive days after the send (a reader back from holiday)."""
        batch = []
        for lid in ledger_ids:
            at = self.messages[lid]["sent_at"] + timedelta(days=days)
            batch.append(self._event(lid, "open", at))
            if lid % 3 == 0:
                batch.append(self._event(lid, "click", at + timedelta(minutes=1), url="https://x"))
        with self.engine.begin() as conn:
            store_events(conn, batch)
        self.events.extend(batch)

    def buy(self, customer_ids: list[int], *, around: datetime, spread_h: float) -> None:
        rows = []
        for cid in customer_ids:
            at = around + timedelta(hours=self.rng.uniform(-spread_h, spread_h), seconds=cid)
            status = self.rng.choice(["placed", "shipped", "delivered", "cancelled", "refunded"])
            rows.append(
                {
                    "id": self.next_order,
                    "customer_id": cid,
                    "status": status,
                    "total": Decimal(f"{self.rng.randint(500, 30000) / 100:.2f}"),
                    "created_at": at,
                    "updated_at": at,
                }
            )
            self.next_order += 1
        with self.engine.begin() as conn:
            conn.execute(insert(orders), rows)
        self.orders.extend(rows)

    # --- the recomputation ------------------------------------------------------------

    def expected_facts(self) -> dict[int, dict[str, Any]]:
        # Stored once by sg_event_id and once by (message id, event, timestamp, email).
        seen: set[Any] = set()
        per: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ev in self.events:
            natural = (ev["sg_message_id"], ev["event"], ev["timestamp"], ev["email"])
            if ev["sg_event_id"] in seen or natural in seen:
                continue
            seen.update((ev["sg_event_id"], natural))
            per[int(ev["ledger_id"])].append(ev)
        facts: dict[int, dict[str, Any]] = {}
        for lid, msg in self.messages.items():
            evs = per[lid]
            machine = [e for e in evs if e["event"] == "open" and e.get("sg_machine_open")]
            names = [e["event"] for e in evs if e not in machine]
            facts[lid] = {
                "trigger": msg["trigger"],
                "variant": msg["variant"] or DEFAULT_VARIANT,
                "day": msg["sent_at"].date(),
                # Engagement proves delivery when the delivered event is missing.
                "delivered": bool({"delivered", "open", "click"} & {e["event"] for e in evs}),
                "machine_opens": len(machine),
                "bounced": any(e["event"] == "bounce" and e["type"] == "bounce" for e in evs),
                "blocked": any(e["event"] == "bounce" and e["type"] == "blocked" for e in evs),
                "dropped": "dropped" in names,
                "deferred": "deferred" in names,
                "opens": names.count("open"),
                "clicks": names.count("click"),
                "unsubscribed": "unsubscribe" in names,
                "spam_reported": "spamreport" in names,
                "orders": 0,
                "revenue": Decimal("0"),
            }
        for order in self.orders:
            if order["status"] in ("cancelled", "refunded"):
                continue
            before = [
                m
                for m in self.messages.values()
                if m["customer_id"] == order["customer_id"]
                and m["sent_at"] < order["created_at"] <= m["sent_at"] + WINDOW
            ]
            if before:
                last = max(before, key=lambda m: m["sent_at"])
                facts[last["id"]]["orders"] += 1
                facts[last["id"]]["revenue"] += order["total"]
        return facts

    def expected_daily(self) -> dict[tuple[str, str, Any], dict[str, Any]]:
        daily: dict[tuple[str, str, Any], dict[str, Any]] = {}
        for f in self.expected_facts().values():
            key = (f["trigger"], f["variant"], f["day"])
            d = daily.setdefault(key, {c: 0 for c in COUNT_COLUMNS} | {"revenue": Decimal(0)})
            d["sent"] += 1
            d["delivered"] += f["delivered"]
            for c in ("bounced", "blocked", "dropped", "deferred"):
                d[c] += f[c]
            # A click implies a human open.
            d["unique_opens"] += f["opens"] > 0 or f["clicks"] > 0
            d["unique_clicks"] += f["clicks"] > 0
            d["opens"] += f["opens"]
            d["clicks"] += f["clicks"]
            d["unique_machine_opens"] += f["machine_opens"] > 0
            d["machine_opens"] += f["machine_opens"]
            d["unsubscribes"] += f["unsubscribed"]
            d["spam_reports"] += f["spam_reported"]
            d["conversions_last_touch"] += f["orders"] > 0
            d["orders"] += f["orders"]
            d["revenue"] += f["revenue"]
        return daily


def stored_daily(engine: Engine) -> dict[tuple[str, str, Any], dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(metrics_daily)).mappings().all()
    return {
        (r["trigger"], r["variant"], r["day"]): {c: r[c] for c in COUNT_COLUMNS}
        | {"revenue": Decimal(r["revenue"]).quantize(Decimal("0.01"))}
        for r in rows
    }


def build_world(engine: Engine, seed: int = 7) -> World:
    w = World(engine, seed)
    people = w.customers(240)
    first = w.send(people[:160], "abandoned_cart", start=T0)
    # Some customers hear from two triggers: last touch decides which one converts.
    second = w.send(people[100:240], "welcome", start=T0 + timedelta(hours=20))
    w.engage(first + second)
    w.buy(people[::2], around=T0 + timedelta(hours=40), spread_h=60)
    return w


def test_rollup_equals_recomputation_from_raw_rows(engine: Engine) -> None:
    w = build_world(engine)
    result = rollup(engine)
    assert result.full
    assert result.messages == len(w.messages)

    expected = w.expected_daily()
    assert stored_daily(engine) == expected
    # The data must exercise what it checks.
    totals = {c: sum(d[c] for d in expected.values()) for c in COUNT_COLUMNS}
    for column in COUNT_COLUMNS:
        assert totals[column] > 0, column
    assert len({k[0] for k in expected}) == 2 and len({k[1] for k in expected}) == 2

    facts = w.expected_facts()
    with engine.connect() as conn:
        stored = {r.ledger_id: r for r in conn.execute(select(message_facts))}
    assert set(stored) == set(facts)
    for lid, fact in facts.items():
        row = stored[lid]
        assert (row.opens, row.machine_opens, row.clicks, row.orders) == (
            fact["opens"],
            fact["machine_opens"],
            fact["clicks"],
            fact["orders"],
        )
        assert Decimal(row.revenue).quantize(Decimal("0.01")) == fact["revenue"]


def test_incremental_rollup_matches_a_full_rebuild_and_reruns_change_nothing(
    engine: Engine,
) -> None:
    w = build_world(engine)
    rollup(engine)
    people = w.customers(60)
    later = w.send(people, "abandoned_cart", start=T0 + timedelta(days=3))
    # New events for new sends and late events for old ones (opens days later).
    w.engage(later)
    w.late_engagement(list(range(1, 40)), days=2)
    # Orders loaded now, placed up to 5 hours ago (a late warehouse load), by new and
    # old recipients.
    w.buy(people[:30] + list(range(150, 240, 3)), around=utcnow() - timedelta(hours=3), spread_h=2)

    # No overlap, so only what changed is picked up (by default recent rows are re-read).
    inc = rollup(engine, overlap=timedelta(0))
    assert not inc.full
    assert 0 < inc.customers < w.next_customer - 1
    assert stored_daily(engine) == w.expected_daily()

    # Nothing new: only customers with orders still inside the attribution window.
    again = rollup(engine, overlap=timedelta(0))
    assert stored_daily(engine) == w.expected_daily()
    assert again.customers <= inc.customers
    rollup(engine)
    assert stored_daily(engine) == w.expected_daily()

    # An order loaded days late, with its old timestamp, after a recent reminder:
    # incremental runs look back only LATE_ORDERS; the full rebuild counts it.
    now = utcnow()
    buyers = {o["customer_id"] for o in w.orders}
    recent = max(
        (
            m
            for m in w.messages.values()
            if now - timedelta(hours=60) < m["sent_at"] < now - 2 * LATE_ORDERS
            and m["customer_id"] not in buyers
        ),
        key=lambda m: m["sent_at"],
    )
    w.buy([recent["customer_id"]], around=recent["sent_at"] + timedelta(hours=1), spread_h=0)
    w.orders[-1]["status"] = "placed"
    with engine.begin() as conn:
        conn.execute(
            orders.update().where(orders.c.id == w.orders[-1]["id"]).values(status="placed")
        )
    rollup(engine, overlap=timedelta(0))
    assert stored_daily(engine) != w.expected_daily()
    rollup(engine, full=True)
    assert stored_daily(engine) == w.expected_daily()


def test_views_give_rates_that_add_up(engine: Engine) -> None:
    build_world(engine)
    rollup(engine)
    with engine.connect() as conn:
        totals = conn.execute(
            text(
                "SELECT trigger, variant, sent, delivered, unique_opens, unique_clicks, "
                "delivery_rate, open_rate, click_to_open_rate, conversion_rate_last_touch "
                "FROM mf_engagement_totals ORDER BY trigger, variant"
            )
        ).all()
        daily_sent = conn.execute(text("SELECT SUM(sent) FROM mf_engagement_daily")).scalar_one()
    assert sum(r.sent for r in totals) == daily_sent
    for r in totals:
        assert r.delivery_rate == pytest.approx(r.delivered / r.sent)
        assert r.open_rate == pytest.approx(r.unique_opens / r.delivered)
        assert r.click_to_open_rate == pytest.approx(r.unique_clicks / r.unique_opens)
        assert 0 <= r.conversion_rate_last_touch <= 1
        assert r.unique_clicks <= r.unique_opens <= r.delivered


def test_events_for_unknown_or_unsent_messages_are_not_counted(engine: Engine) -> None:
    w = build_world(engine)
    with engine.begin() as conn:
        store_events(
            conn,
            [
                {
                    "sg_event_id": "stray-1",
                    "event": "open",
                    "email": "x@example.com",
                    "timestamp": 1_790_000_000,
                    "ledger_id": "999999",
                },
                {
                    "sg_event_id": "stray-2",
                    "event": "delivered",
                    "email": "x@example.com",
                    "timestamp": 1_790_000_000,
                },
            ],
        )
        n_events = conn.execute(select(events.c.id)).all()
    assert len(n_events) > 2
    rollup(engine)
    assert stored_daily(engine) == w.expected_daily()


def test_two_rollups_at_once_both_finish_with_the_right_numbers(engine: Engine) -> None:
    # A scheduled run and `mailflow report` may start together.
    from concurrent.futures import ThreadPoolExecutor

    w = build_world(engine)
    rollup(engine)
    w.late_engagement(list(range(1, 120)), days=1)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda full: rollup(engine, full=full, chunk=20), (True, False)))
    assert {r.full for r in results} == {True, False}
    assert stored_daily(engine) == w.expected_daily()


def test_an_order_that_moves_to_another_customer_is_credited_once(engine: Engine) -> None:
    w = World(engine, seed=3)
    guest, account = w.customers(2)
    start = utcnow() - timedelta(hours=30)
    (to_guest,) = w.send([guest], "abandoned_cart", start=start)
    (to_account,) = w.send([account], "welcome", start=start)
    placed = max(m["sent_at"] for m in w.messages.values()) + timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(
            insert(orders).values(
                id=1,
                customer_id=guest,
                status="placed",
                total=Decimal("30.00"),
                created_at=placed,
                updated_at=placed,
            )
        )
    rollup(engine)

    def credited() -> dict[int, int]:
        with engine.connect() as conn:
            rows = conn.execute(select(message_facts.c.ledger_id, message_facts.c.orders))
            return {lid: n for lid, n in rows if lid in (to_guest, to_account)}

    assert credited() == {to_guest: 1, to_account: 0}
    # The guest order is linked to the customer's account: it now belongs to them.
    with engine.begin() as conn:
        conn.execute(
            orders.update().where(orders.c.id == 1).values(customer_id=account, updated_at=utcnow())
        )
    rollup(engine, overlap=timedelta(0))
    assert credited() == {to_guest: 0, to_account: 1}
    with engine.connect() as conn:
        total = conn.execute(
            text("select sum(conversions_last_touch) from mf_metrics_daily")
        ).scalar_one()
    assert total == 1
    rollup(engine, full=True)
    assert credited() == {to_guest: 0, to_account: 1}


def test_times_to_open_and_click_are_exact_and_never_negative(engine: Engine) -> None:
    import numpy as np

    w = World(engine, seed=5)
    people = w.customers(7)
    start = utcnow().replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    sent = w.send(people, "welcome", start=start)
    with engine.begin() as conn:  # every variant the same: one daily row
        conn.execute(send_ledger.update().values(variant=None))
    # sent_at has microseconds; SendGrid's times are whole seconds and may name the
    # same second as the send (or, with clocks apart, the one before): 0, not negative.
    offsets = {sent[0]: 0, sent[1]: -1, sent[2]: 7, sent[3]: 60, sent[4]: 3_600, sent[5]: 95}
    batch = []
    for lid, seconds in offsets.items():
        msg = w.messages[lid]
        msg["sent_at"] = msg["sent_at"].replace(microsecond=700_000)
        at = msg["sent_at"].replace(microsecond=0) + timedelta(seconds=seconds)
        # A machine open does not count (even the first); a click without an open does.
        proxy = msg["sent_at"] - timedelta(seconds=3) if seconds > 0 else at + timedelta(hours=2)
        batch.append(w._event(lid, "open", proxy, sg_machine_open=True))
        batch.append(w._event(lid, "click" if lid == sent[5] else "open", at))
        if lid in (sent[2], sent[3]):
            batch.append(w._event(lid, "click", at + timedelta(seconds=30)))
    with engine.begin() as conn:
        for lid in offsets:
            conn.execute(
                send_ledger.update()
                .where(send_ledger.c.id == lid)
                .values(sent_at=w.messages[lid]["sent_at"])
            )
        store_events(conn, batch)
    rollup(engine)
    with engine.connect() as conn:
        (row,) = conn.execute(select(metrics_daily)).mappings().all()
    to_open = [max(s, 0) for s in offsets.values()]
    to_click = [37, 90, 95]
    assert row["unique_opens"] == 6 and row["unique_machine_opens"] == 6
    assert row["median_seconds_to_open"] == pytest.approx(np.median(to_open), abs=1e-9)
    assert row["p90_seconds_to_open"] == pytest.approx(np.percentile(to_open, 90), abs=1e-9)
    assert row["median_seconds_to_click"] == pytest.approx(np.median(to_click), abs=1e-9)
    assert row["p90_seconds_to_click"] == pytest.approx(np.percentile(to_click, 90), abs=1e-9)


def test_an_order_by_a_customer_never_sent_anything_beside_one_who_was(engine: Engine) -> None:
    # Found by the property test: an incremental run recomputing, in one chunk, a customer
    # who was sent a message and a buyer who never was, crashed in the attribution.
    w = World(engine, seed=2)
    sent_to, buyer = w.customers(2)
    rollup(engine)
    w.send([sent_to], "welcome", start=utcnow() - timedelta(hours=2))
    w.buy([buyer], around=utcnow() - timedelta(hours=1), spread_h=0)
    w.orders[-1]["status"] = "placed"
    with engine.begin() as conn:
        conn.execute(orders.update().values(status="placed"))
    result = rollup(engine, overlap=timedelta(0))
    assert not result.full and result.customers == 2
    assert stored_daily(engine) == w.expected_daily()
