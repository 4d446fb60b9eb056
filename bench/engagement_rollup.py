"""Engagement rollup: 1,000,000 events into the metric tables, then an incremental run.

Builds a fresh SQLite warehouse with two weeks of history: sent messages in the
ledger, about ``--events`` webhook events for them (received over those two weeks)
and the customers' orders. Then it times

1. a full rollup (the first run): every fact and every day;
2. an incremental rollup after ``--new-events`` more events (late opens and clicks
   of old messages plus the events of a fresh send) and a few new orders.

Baseline in the same run: one GROUP BY pass over the whole events table (ledger id
× event type, fetched), the least any rollup has to read. Afterwards it checks that
the incremental result equals a full rebuild.

    .venv/bin/python bench/engagement_rollup.py --events 1000000 --new-events 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailflow.clock import utcnow  # noqa: E402
from mailflow.metrics import rollup  # noqa: E402
from mailflow.warehouse.engine import make_engine  # noqa: E402
from mailflow.warehouse.migrate import upgrade  # noqa: E402
from mailflow.warehouse.schema import (  # noqa: E402
    customers,
    events,
    metrics_daily,
    orders,
    send_ledger,
)

TRIGGERS = ("abandoned_cart", "welcome", "weekly_digest")
CHUNK = 50_000
EVENTS_PER_MESSAGE = 3.0  # processed, delivered, opens, clicks …: about 3 a message


def _insert(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for start in range(0, len(rows), CHUNK):
            conn.execute(insert(table), rows[start : start + CHUNK])


class History:
    """Synthetic sends, events and orders; ids continue across calls."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.now = utcnow()
        self.next_event = 1
        self.next_ledger = 1

    def customers(self, n: int) -> None:
        created = self.now - timedelta(days=400)
        _insert(
            self.engine,
            customers,
            [
                {"id": i, "email": f"c{i}@example.com", "created_at": created}
                for i in range(1, n + 1)
            ],
        )
        self.n_customers = n

    def send(self, n: int, *, days: float) -> list[tuple[int, Any]]:
        """``n`` sent messages spread over the last ``days``; (ledger id, sent_at) each."""
        rng = self.rng
        ages = rng.uniform(0, days * 86_400, n)
        cust = rng.integers(1, self.n_customers + 1, n)
        trig = rng.integers(0, len(TRIGGERS), n)
        vip = rng.random(n) < 0.2
        rows, out = [], []
        for k in range(n):
            lid = self.next_ledger
            self.next_ledger += 1
            sent_at = self.now - timedelta(seconds=float(ages[k]))
            rows.append(
                {
                    "id": lid,
                    "dedupe_key": f"{TRIGGERS[trig[k]]}:{lid}",
                    "trigger": TRIGGERS[trig[k]],
                    "customer_id": int(cust[k]),
                    "email": f"c{cust[k]}@example.com",
                    "variant": "vip" if vip[k] else None,
                    "status": "sent",
                    "context": {},
                    "created_at": sent_at,
                    "updated_at": sent_at,
                    "sent_at": sent_at,
                }
            )
            out.append((lid, sent_at))
        _insert(self.engine, send_ledger, rows)
        return out

    def _event(self, lid: int, name: str, at: Any, received: Any) -> dict[str, Any]:
        n = self.next_event
        self.next_event += 1
        return {
            "sg_event_id": f"ev-{n}",
            "natural_key": f"nk-{n}",
            "event": name,
            "email": f"m{lid}@example.com",
            "occurred_at": at,
            "sg_message_id": f"msg-{lid}",
            "ledger_id": lid,
            "trigger": None,
            "url": "https://shop.example.com/cart" if name == "click" else None,
            "reason": None,
            "bounce_type": ("blocked" if n % 3 == 0 else "bounce") if name == "bounce" else None,
            # About a quarter of opens come from a privacy proxy (sg_machine_open).
            "machine_open": name == "open" and n % 4 == 0,
            "raw": {},
            "received_at": received,
        }

    def engage(self, sent: list[tuple[int, Any]], *, received_now: bool) -> int:
        """Events for each message, like SendGrid's: processed, then delivered or not, …"""
        rng = self.rng
        rows: list[dict[str, Any]] = []
        fate = rng.random(len(sent))
        opens = rng.poisson(1.5, len(sent)) * (rng.random(len(sent)) < 0.55)
        clicks = rng.poisson(1.2, len(sent)) * (rng.random(len(sent)) < 0.35)
        for k, (lid, sent_at) in enumerate(sent):
            recv = self.now if received_now else sent_at + timedelta(minutes=2)
            rows.append(self._event(lid, "processed", sent_at + timedelta(seconds=1), recv))
            if fate[k] < 0.03:
                rows.append(self._event(lid, "bounce", sent_at + timedelta(seconds=9), recv))
                continue
            if fate[k] < 0.04:
                rows.append(self._event(lid, "dropped", sent_at + timedelta(seconds=2), recv))
                continue
            if fate[k] > 0.97:
                rows.append(self._event(lid, "deferred", sent_at + timedelta(seconds=5), recv))
            rows.append(self._event(lid, "delivered", sent_at + timedelta(seconds=10), recv))
            for j in range(int(opens[k])):
                rows.append(self._event(lid, "open", sent_at + timedelta(minutes=30 + j), recv))
            for j in range(int(opens[k] and clicks[k])):
                rows.append(self._event(lid, "click", sent_at + timedelta(minutes=31 + j), recv))
            if fate[k] > 0.995:
                rows.append(self._event(lid, "unsubscribe", sent_at + timedelta(hours=1), recv))
            elif 0.5 < fate[k] < 0.5008:
                rows.append(self._event(lid, "spamreport", sent_at + timedelta(hours=1), recv))
        _insert(self.engine, events, rows)
        return len(rows)

    def late_opens(self, sent: list[tuple[int, Any]], n: int) -> int:
        picks = self.rng.choice(len(sent), n, replace=False)
        rows = [
            self._event(sent[i][0], "open" if j % 4 else "click", self.now, self.now)
            for j, i in enumerate(picks)
        ]
        _insert(self.engine, events, rows)
        return len(rows)

    def buy(self, n: int, *, days: float) -> None:
        rng = self.rng
        ages = rng.uniform(0, days * 86_400, n)
        cust = rng.integers(1, self.n_customers + 1, n)
        total = rng.uniform(10, 300, n).round(2)
        rows = []
        for k in range(n):
            at = self.now - timedelta(seconds=float(ages[k]))
            rows.append(
                {
                    "customer_id": int(cust[k]),
                    "status": "placed",
                    "total": float(total[k]),
                    "created_at": at,
                    "updated_at": at,
                }
            )
        _insert(self.engine, orders, rows)


def daily(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        cols = [c for c in metrics_daily.c if c.name != "updated_at"]
        return list(conn.execute(select(*cols).order_by(*metrics_daily.primary_key)).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--new-events", type=int, default=10_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mailflow-rollup-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'warehouse.db'}"
        upgrade(url)
        engine = make_engine(url)
        h = History(engine, args.seed)
        t0 = time.perf_counter()
        h.customers(args.customers)
        history = h.send(int(args.events / EVENTS_PER_MESSAGE), days=14)
        n_events = h.engage(history, received_now=False)
        h.buy(args.customers // 5, days=14)
        print(
            f"history: {len(history):,} sent messages, {n_events:,} events, "
            f"{args.customers // 5:,} orders over 14 days "
            f"(built in {time.perf_counter() - t0:.1f}s)"
        )

        t0 = time.perf_counter()
        with engine.connect() as conn:
            scanned = conn.execute(
                select(events.c.ledger_id, events.c.event, func.count()).group_by(
                    events.c.ledger_id, events.c.event
                )
            ).all()
        baseline = time.perf_counter() - t0
        print(
            f"baseline, one GROUP BY pass over mf_events: {baseline:.2f}s ({len(scanned):,} groups)"
        )

        full = rollup(engine)
        print(
            f"full rollup: {n_events:,} events, {full.messages:,} messages, "
            f"{len(full.days)} days in {full.seconds:.2f}s "
            f"({n_events / full.seconds:,.0f} events/s; "
            f"{full.seconds / baseline:.1f}x the baseline)"
        )

        # The next quarter hour: late opens and clicks, a fresh send with its events,
        # and new orders.
        fresh = h.send(args.new_events // 8, days=0.01)
        added = h.engage(fresh, received_now=True)
        added += h.late_opens(history, max(args.new_events - added, 0))
        h.buy(200, days=0.01)
        inc = rollup(engine)
        print(
            f"incremental rollup after {added:,} new events: {inc.customers:,} customers, "
            f"{inc.messages:,} messages, {len(inc.days)} days in {inc.seconds:.2f}s"
        )
        after_inc = daily(engine)
        rebuilt = rollup(engine, full=True)
        same = after_inc == daily(engine)
        print(
            f"full rebuild afterwards: {rebuilt.seconds:.2f}s; same numbers as incremental: {same}"
        )
        engine.dispose()
        if not same:
            raise SystemExit("incremental and full rollups disagree")


if __name__ == "__main__":
    main()
