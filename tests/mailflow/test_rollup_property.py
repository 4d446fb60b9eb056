"""A property test of the engagement rollup (metrics contract v2, docs/metrics.md).

Hypothesis draws histories: sends (some never sent), events through the real ingest
path (redelivered with the same or a new ``sg_event_id``, out of order, for unknown
ledger ids, machine opens, a click without an open), orders (late loads within the
incremental look-back, cancelled, refunded, moved to another customer) and incremental
rollup runs in between, in any order. After every run:

- the tables equal a full rebuild (the full rebuild runs, is compared, and the
  incremental watermark is put back, so the next incremental run goes on from it);
- they equal a from-scratch recomputation written here, in pandas, from the raw
  ledger, events and orders — independently of ``mailflow.metrics``.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select, update

from mailflow.clock import utcnow
from mailflow.metrics import LATE_ORDERS, rollup
from mailflow.metrics import TIME_COLUMNS as TIMES
from mailflow.report import COUNTS
from mailflow.warehouse.schema import (
    customers,
    events,
    message_facts,
    metrics_daily,
    order_attribution,
    orders,
    rollup_state,
    send_ledger,
    suppressions,
)
from mailflow.webhook.ingest import store_events

MAX_EXAMPLES = 40
CUSTOMERS = 4
WINDOW = timedelta(hours=72)
TRIGGERS = ("abandoned_cart", "welcome")
EVENT_KINDS = (
    "delivered", "open", "machine_open", "click", "bounce", "blocked", "dropped",
    "deferred", "unsubscribe", "spamreport",
)  # fmt: skip

send_step = st.tuples(
    st.just("send"),
    st.integers(1, CUSTOMERS),
    st.sampled_from(TRIGGERS),
    st.sampled_from([None, "b"]),
    st.integers(0, 4 * 24 * 60),  # minutes ago
    st.sampled_from(["sent", "sent", "sent", "failed", "unknown"]),
)
event_step = st.tuples(
    st.just("event"),
    st.integers(0, 50),  # which message (modulo), or an unknown id
    st.sampled_from(EVENT_KINDS),
    st.integers(-2, 200_000),  # seconds after the send's second
    st.sampled_from(["once", "once", "same id", "new id"]),
    st.booleans(),  # unknown ledger id
)
order_step = st.tuples(
    st.just("order"),
    st.integers(1, CUSTOMERS),
    st.integers(0, int(LATE_ORDERS.total_seconds() // 60) - 5),  # placed minutes ago
    st.sampled_from(["placed", "placed", "shipped", "cancelled", "refunded"]),
)
change_step = st.tuples(
    st.just("change"),
    st.integers(0, 50),  # which order (modulo)
    st.sampled_from(["cancelled", "refunded", "placed", "move"]),
    st.integers(1, CUSTOMERS),
)
rollup_step = st.tuples(st.just("rollup"))
history = st.lists(
    st.one_of(
        send_step,
        send_step,
        event_step,
        event_step,
        event_step,
        order_step,
        change_step,
        rollup_step,
    ),  # fmt: skip
    min_size=1,
    max_size=20,
)


class History:
    """Plays one drawn history against the warehouse."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.now = utcnow()
        self.sends: list[tuple[int, datetime, str]] = []  # id, sent_at, email
        self.orders: list[int] = []
        self.next_ledger = 1
        self.next_order = 1
        self.next_event = 1
        self.rollups = 0

    def reset(self) -> None:
        with self.engine.begin() as conn:
            for table in (
                message_facts, metrics_daily, order_attribution, rollup_state, events,
                suppressions, orders, send_ledger, customers,
            ):  # fmt: skip
                conn.execute(delete(table))
            conn.execute(
                insert(customers),
                [
                    {"id": i, "email": f"c{i}@example.com", "created_at": self.now}
                    for i in range(1, CUSTOMERS + 1)
                ],
            )

    def play(self, step: tuple[Any, ...]) -> None:
        getattr(self, f"_{step[0]}")(*step[1:])

    def _send(
        self, customer: int, trigger: str, variant: str | None, ago: int, status: str
    ) -> None:
        lid = self.next_ledger
        self.next_ledger += 1
        # Microseconds, as the ledger records them; unique, so last touch is never a tie.
        sent_at = self.now - timedelta(minutes=ago, microseconds=lid * 1_013)
        email = f"c{customer}@example.com"
        with self.engine.begin() as conn:
            conn.execute(
                insert(send_ledger).values(
                    id=lid,
                    dedupe_key=f"{trigger}:{lid}",
                    trigger=trigger,
                    customer_id=customer,
                    email=email,
                    variant=variant,
                    status=status,
                    context={},
                    created_at=sent_at,
                    updated_at=utcnow(),
                    sent_at=sent_at if status == "sent" else None,
                )
            )
        if status == "sent":
            self.sends.append((lid, sent_at, email))

    def _event(self, pick: int, kind: str, after_s: int, delivery: str, unknown: bool) -> None:
        if unknown or not self.sends:
            lid, sent_at, email = 10_000 + pick, self.now - timedelta(days=1), "x@example.com"
        else:
            lid, sent_at, email = self.sends[pick % len(self.sends)]
        at = sent_at.replace(microsecond=0) + timedelta(seconds=after_s)
        name = {"machine_open": "open", "blocked": "bounce"}.get(kind, kind)
        event: dict[str, Any] = {
            "sg_event_id": f"e{self.next_event}",
            "event": name,
            "email": email,
            "timestamp": int((at - datetime(1970, 1, 1)).total_seconds()),
            "sg_message_id": f"m{lid}.filter",
            "ledger_id": str(lid),
        }
        self.next_event += 1
        if name == "open":
            event["sg_machine_open"] = kind == "machine_open"
        if name == "bounce":
            event["type"] = "blocked" if kind == "blocked" else "bounce"
        batch = [event]
        if delivery == "same id":
            batch.append(dict(event))
        elif delivery == "new id":  # the same event again under another sg_event_id
            batch.append({**event, "sg_event_id": f"e{self.next_event}"})
            self.next_event += 1
        batch.reverse()
        with self.engine.begin() as conn:
            for e in batch:  # one post each: redeliveries arrive in later batches
                store_events(conn, [e])

    def _order(self, customer: int, ago: int, status: str) -> None:
        oid = self.next_order
        self.next_order += 1
        # A late load: placed up to LATE_ORDERS ago, written now.
        placed = self.now - timedelta(minutes=ago, microseconds=oid * 997)
        with self.engine.begin() as conn:
            conn.execute(
                insert(orders).values(
                    id=oid,
                    customer_id=customer,
                    status=status,
                    total=Decimal(f"{10 + oid}.25"),
                    created_at=placed,
                    updated_at=utcnow(),
                )
            )
        self.orders.append(oid)

    def _change(self, pick: int, what: str, customer: int) -> None:
        if not self.orders:
            return
        oid = self.orders[pick % len(self.orders)]
        values: dict[str, Any] = {"updated_at": utcnow()}
        if what == "move":
            values["customer_id"] = customer
        else:
            values["status"] = what
        with self.engine.begin() as conn:
            conn.execute(update(orders).where(orders.c.id == oid).values(**values))

    def _rollup(self) -> None:
        rollup(self.engine, overlap=timedelta(0))
        self.rollups += 1
        self.check()

    def check(self) -> None:
        incremental = snapshot(self.engine)
        assert incremental == recompute(self.engine), "incremental != recomputation"
        with self.engine.connect() as conn:
            state = conn.execute(select(rollup_state)).mappings().one()
        rollup(self.engine, full=True)
        assert snapshot(self.engine) == incremental, "incremental != full rebuild"
        with self.engine.begin() as conn:  # the next incremental run goes on from its own
            conn.execute(update(rollup_state).values(**state))


def _number(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 6)


def snapshot(engine: Engine) -> dict[str, Any]:
    """The rollup's tables as plain values."""
    f, m = message_facts.c, metrics_daily.c
    with engine.connect() as conn:
        facts = {
            r.ledger_id: (
                r.trigger,
                r.variant,
                r.customer_id,
                r.send_day,
                r.delivered_at is not None,
                bool(r.bounced),
                bool(r.blocked),
                bool(r.dropped),
                bool(r.deferred),
                r.opens,
                r.machine_opens,
                r.first_open_at,
                r.clicks,
                r.first_click_at,
                bool(r.unsubscribed),
                bool(r.spam_reported),
                r.orders,
                Decimal(r.revenue).quantize(Decimal("0.01")),
            )  # fmt: skip
            for r in conn.execute(select(message_facts).order_by(f.ledger_id))
        }
        daily = {
            (r["trigger"], r["variant"], r["day"]): (
                tuple(int(r[c]) for c in COUNTS),
                Decimal(r["revenue"]).quantize(Decimal("0.01")),
                tuple(_number(r[t]) for t in TIMES),
            )
            for r in conn.execute(select(metrics_daily).order_by(m.day)).mappings()
        }
        credited = {
            int(o): int(lid)
            for o, lid in conn.execute(
                select(order_attribution.c.order_id, order_attribution.c.ledger_id)
            )
        }
    return {"facts": facts, "daily": daily, "attribution": credited}


def _frame(engine: Engine, stmt: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        return pd.DataFrame(result.all(), columns=list(result.keys()))


def recompute(engine: Engine) -> dict[str, Any]:
    """The contract's numbers from the raw rows, in pandas (not mailflow.metrics)."""
    ledger = _frame(engine, select(send_ledger).where(send_ledger.c.status == "sent"))
    evs = _frame(engine, select(events))
    placed = _frame(engine, select(orders))
    facts: dict[int, Any] = {}
    per_message: dict[int, dict[str, Any]] = {}
    for msg in ledger.itertuples(index=False):
        mine = evs[evs["ledger_id"] == msg.id]
        kinds = mine["event"].tolist()
        machine = mine["machine_open"].astype(bool)
        human_opens = mine[(mine["event"] == "open") & ~machine]
        clicks = mine[mine["event"] == "click"]
        bounces = mine[mine["event"] == "bounce"]["bounce_type"].fillna("bounce").str.lower()
        sent_at = pd.Timestamp(msg.sent_at).to_pydatetime()
        per_message[int(msg.id)] = {
            "trigger": msg.trigger,
            "variant": msg.variant if isinstance(msg.variant, str) else "default",
            "customer": int(msg.customer_id),
            "sent_at": sent_at,
            "day": sent_at.date(),
            "delivered": bool({"delivered", "open", "click"} & set(kinds)),
            "bounced": bool((bounces != "blocked").any()),
            "blocked": bool((bounces == "blocked").any()),
            "dropped": "dropped" in kinds,
            "deferred": "deferred" in kinds,
            "opens": len(human_opens),
            "machine_opens": int(((mine["event"] == "open") & machine).sum()),
            "first_open": human_opens["occurred_at"].min() if len(human_opens) else None,
            "clicks": len(clicks),
            "first_click": clicks["occurred_at"].min() if len(clicks) else None,
            "unsubscribed": bool({"unsubscribe", "group_unsubscribe"} & set(kinds)),
            "spam": "spamreport" in kinds,
            "orders": 0,
            "revenue": Decimal("0.00"),
        }
    credited: dict[int, int] = {}
    for o in placed.itertuples(index=False):
        if o.status in ("cancelled", "refunded"):
            continue
        at = pd.Timestamp(o.created_at).to_pydatetime()
        before = [
            (m["sent_at"], lid)
            for lid, m in per_message.items()
            if m["customer"] == o.customer_id and m["sent_at"] < at <= m["sent_at"] + WINDOW
        ]
        if before:
            lid = max(before)[1]
            credited[int(o.id)] = lid
            per_message[lid]["orders"] += 1
            per_message[lid]["revenue"] += Decimal(o.total).quantize(Decimal("0.01"))

    def stamp(value: Any) -> datetime | None:
        return None if value is None or pd.isna(value) else pd.Timestamp(value).to_pydatetime()

    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for lid, m in per_message.items():
        facts[lid] = (
            m["trigger"], m["variant"], m["customer"], m["day"], m["delivered"], m["bounced"],
            m["blocked"], m["dropped"], m["deferred"], m["opens"], m["machine_opens"],
            stamp(m["first_open"]), m["clicks"], stamp(m["first_click"]), m["unsubscribed"],
            m["spam"], m["orders"], m["revenue"],
        )  # fmt: skip
        groups.setdefault((m["trigger"], m["variant"], m["day"]), []).append(m)
    daily = {}
    for key, ms in groups.items():
        opened = [m for m in ms if m["opens"] or m["clicks"]]
        counts = {
            "sent": len(ms),
            "delivered": sum(m["delivered"] for m in ms),
            "bounced": sum(m["bounced"] for m in ms),
            "blocked": sum(m["blocked"] for m in ms),
            "dropped": sum(m["dropped"] for m in ms),
            "deferred": sum(m["deferred"] for m in ms),
            "unique_opens": len(opened),
            "unique_clicks": sum(m["clicks"] > 0 for m in ms),
            "opens": sum(m["opens"] for m in ms),
            "clicks": sum(m["clicks"] for m in ms),
            "unique_machine_opens": sum(m["machine_opens"] > 0 for m in ms),
            "machine_opens": sum(m["machine_opens"] for m in ms),
            "unsubscribes": sum(m["unsubscribed"] for m in ms),
            "spam_reports": sum(m["spam"] for m in ms),
            "conversions_last_touch": sum(m["orders"] > 0 for m in ms),
            "orders": sum(m["orders"] for m in ms),
        }

        def seconds(m: dict[str, Any], at: Any) -> float:
            floor = m["sent_at"].replace(microsecond=0)
            return max(0.0, (stamp(at) - floor).total_seconds())  # type: ignore[operator]

        to_open = [
            seconds(m, min(t for t in (stamp(m["first_open"]), stamp(m["first_click"])) if t))
            for m in opened
        ]
        to_click = [seconds(m, m["first_click"]) for m in ms if m["clicks"]]
        times = []
        for values in (to_open, to_click):
            for q in (50, 90):
                times.append(_number(np.percentile(values, q)) if values else None)
        daily[key] = (
            tuple(counts[c] for c in COUNTS),
            sum((m["revenue"] for m in ms), Decimal("0.00")),
            tuple(times),
        )
    return {"facts": facts, "daily": daily, "attribution": credited}


def test_incremental_rollup_equals_full_rebuild_equals_recomputation(
    engine: Engine, record_property: pytest.RecordProperty
) -> None:
    ran = {"histories": 0, "steps": 0, "rollups": 0}

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(steps=history)
    def one_history(steps: list[tuple[Any, ...]]) -> None:
        h = History(engine)
        h.reset()
        for step in steps:
            h.play(step)
        h._rollup()  # every history ends with a run
        ran["histories"] += 1
        ran["steps"] += len(steps)
        ran["rollups"] += h.rollups

    one_history()
    for name, value in ran.items():
        record_property(name, value)
    print(f"rollup property: {ran['histories']} random histories, {ran['steps']} steps, "
          f"{ran['rollups']} incremental runs, each checked against a full rebuild "
          f"and a recomputation")  # fmt: skip
    assert ran["histories"] >= MAX_EXAMPLES // 2
