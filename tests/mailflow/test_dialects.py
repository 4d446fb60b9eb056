"""Dialect neutrality: the same shop gives the same rows and audiences on SQLite and
PostgreSQL, and a seeded PostgreSQL warehouse still hands out fresh ids."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine, func, insert, select

from mailflow.demo.seed import seed_shop
from mailflow.extract import extract
from mailflow.triggers import ContextDefaults, registry
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.migrate import upgrade
from mailflow.warehouse.schema import (
    cart_items,
    carts,
    customers,
    events,
    order_status_history,
    orders,
    products,
    quarantine,
    suppressions,
)
from mailflow.webhook.ingest import store_events
from tests.pgserver import DatabaseFactory

NOW = datetime(2025, 6, 1, 12, 0)
#: Parameters that make each trigger find someone in the seeded shop at NOW (a Sunday noon
#: UTC); names a trigger does not have are ignored.
PARAMS: dict[str, dict[str, Any]] = {
    "weekly_digest": {"weekday": "sunday", "hour": 12, "window_hours": 24},
}
SHOP = ContextDefaults(
    shop_name="Example Shop",
    shop_url="https://shop.example.com",
    support_email="help@example.com",
    shop_address="1 Example Street",
)


def _plain(value: Any) -> Any:
    """A value as both dialects should agree on it (missing is None, numbers compare)."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, Decimal | float | int) and not isinstance(value, bool):
        return Decimal(str(value)).normalize()
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _dump(engine: Engine) -> dict[str, list[list[Any]]]:
    from mailflow.demo.seed import _SHOP_TABLES

    with engine.connect() as conn:
        return {
            t.name: [_plain(tuple(r)) for r in conn.execute(select(t).order_by(t.c.id))]
            for t in _SHOP_TABLES
        }


@pytest.fixture(scope="module")
def twin_shops(
    tmp_path_factory: pytest.TempPathFactory, postgres_databases: DatabaseFactory
) -> Iterator[tuple[Engine, Engine]]:
    """The same seeded shop in a SQLite file and in a PostgreSQL database."""
    sqlite_url = f"sqlite:///{tmp_path_factory.mktemp('twin') / 'shop.db'}"
    upgrade(sqlite_url)
    pg_url = postgres_databases.create()
    engines = (make_engine(sqlite_url), make_engine(pg_url))
    try:
        for engine in engines:
            seed_shop(engine, customers=1_500, seed=11, now=NOW)
        yield engines
    finally:
        for engine in engines:
            engine.dispose()
        postgres_databases.drop(pg_url)


def test_the_same_seed_writes_the_same_rows_on_sqlite_and_postgresql(
    twin_shops: tuple[Engine, Engine],
) -> None:
    lite, pg = twin_shops
    rows_lite, rows_pg = _dump(lite), _dump(pg)
    assert all(rows_lite.values())
    for table, rows in rows_lite.items():
        assert rows_pg[table] == rows, table


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_trigger_finds_the_same_audience_on_sqlite_and_postgresql(
    name: str, twin_shops: tuple[Engine, Engine]
) -> None:
    trigger = registry()[name]
    params = trigger.params(
        {k: v for k, v in PARAMS.get(name, {}).items() if k in (trigger.defaults or {})}
    )
    seen = []
    for engine in twin_shops:
        with engine.connect() as conn:
            got = extract(conn, trigger, now=NOW, params=params, frequency_cap=3)
            records = [_plain(r) for r in got.frame.to_dict("records")]
            contexts = trigger.build_contexts(conn, got.frame, SHOP) if len(got.frame) else []
        seen.append((got.found, got.excluded, records, _plain(contexts)))
    (found, excluded, records, contexts), pg = seen
    assert found > 0, f"{name}: the seeded shop should have candidates"
    assert pg[0] == found and pg[1] == excluded
    assert [r["dedupe_key"] for r in pg[2]] == [r["dedupe_key"] for r in records]
    assert pg[2] == records
    assert pg[3] == contexts


def test_a_seeded_warehouse_still_hands_out_new_ids(warehouse_url: str) -> None:
    """Explicit ids do not move PostgreSQL's sequences; the seeder must, or inserts collide."""
    engine = make_engine(warehouse_url)
    try:
        seed_shop(engine, customers=50, seed=3, now=NOW)
        seed_shop(engine, customers=30, seed=4, now=NOW, replace=False)
        at = NOW - timedelta(hours=1)
        with engine.begin() as conn:
            before = {
                t.name: conn.execute(select(func.max(t.c.id))).scalar_one()
                for t in (customers, products, carts, cart_items, orders, order_status_history)
            }
            new = {
                "customers": conn.execute(
                    insert(customers)
                    .values(email="new@example.com", created_at=at)
                    .returning(customers.c.id)
                ).scalar_one(),
                "products": conn.execute(
                    insert(products)
                    .values(sku="NEW-1", name="New", price=Decimal("1.00"))
                    .returning(products.c.id)
                ).scalar_one(),
            }
            new["carts"] = conn.execute(
                insert(carts)
                .values(customer_id=new["customers"], created_at=at, updated_at=at)
                .returning(carts.c.id)
            ).scalar_one()
            new["cart_items"] = conn.execute(
                insert(cart_items)
                .values(
                    cart_id=new["carts"],
                    product_id=new["products"],
                    quantity=1,
                    unit_price=Decimal("1.00"),
                )
                .returning(cart_items.c.id)
            ).scalar_one()
            new["orders"] = conn.execute(
                insert(orders)
                .values(
                    customer_id=new["customers"],
                    cart_id=new["carts"],
                    total=Decimal("1.00"),
                    created_at=at,
                    updated_at=at,
                )
                .returning(orders.c.id)
            ).scalar_one()
            new["order_status_history"] = conn.execute(
                insert(order_status_history)
                .values(order_id=new["orders"], status="placed", changed_at=at)
                .returning(order_status_history.c.id)
            ).scalar_one()
        assert {t: new[t] > before[t] for t in new} == {t: True for t in new}
    finally:
        engine.dispose()


def test_webhook_events_with_nul_bytes_are_stored_not_refused(warehouse_url: str) -> None:
    """PostgreSQL text cannot hold NUL (SQLite can): such an event must not fail its batch,
    or SendGrid would redeliver the batch forever."""
    engine = make_engine(warehouse_url)
    try:
        raw = {
            "event": "bounce",
            "email": "nul@example.com",
            "timestamp": 1_700_000_000,
            "sg_event_id": "ev\x00-1",
            "sg_message_id": "msg\x00.1",
            "reason": "550 no\x00such mailbox",
            "type": "bounce",
        }
        with engine.begin() as conn:
            result = store_events(conn, [raw])
        with engine.connect() as conn:
            row = conn.execute(select(events)).one()
            suppressed = conn.execute(select(suppressions.c.email)).scalars().all()
        assert (result.stored, result.suppressed) == (1, 1)
        assert (row.sg_event_id, row.reason) == ("ev-1", "550 nosuch mailbox")
        assert row.raw["reason"] == "550 no\x00such mailbox"  # the event as received
        assert suppressed == ["nul@example.com"]
    finally:
        engine.dispose()


def test_json_columns_take_what_pandas_hands_over(warehouse_url: str) -> None:
    """A quarantined row comes from a DataFrame: numpy scalars (a float subclass among
    them), NaN for a missing value. Both warehouses store them as plain JSON numbers."""
    import numpy as np

    upgrade(warehouse_url)
    engine = make_engine(warehouse_url)
    row = {"open_cart_id": np.float64(206.0), "items": np.int64(4), "cart_total": math.nan}
    raw = {"ledger_id": 10**30, "n": np.float64(1.5)}  # an event may carry any number
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(quarantine),
                [
                    {"trigger": "t", "expectation": "x", "reason": "y", "row": r, "created_at": NOW}
                    for r in (row, raw)
                ],
            )
        with engine.connect() as conn:
            stored = list(
                conn.execute(select(quarantine.c.row).order_by(quarantine.c.id)).scalars()
            )
    finally:
        engine.dispose()
    assert stored == [
        {"open_cart_id": 206.0, "items": 4, "cart_total": None},
        # Written exactly; orjson reads an integer past 64 bits back as a float.
        {"ledger_id": float(10**30), "n": 1.5},
    ]
