"""The synthetic shop: deterministic, dirty in the planned ways, referentially sound, and
its abandoned-cart count agrees with SQL over the tables."""

from __future__ import annotations

import importlib.resources
import re
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select

from mailflow.demo.seed import (
    BENCH_PROFILE,
    DEFAULT_PROFILE,
    SeedProfile,
    SeedStats,
    seed_shop,
)
from mailflow.warehouse import schema
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.schema import cart_items, carts, customers, orders, products

NOW = datetime(2025, 6, 1, 12, 0)
SHOP_TABLES = (customers, products, carts, cart_items, orders)

# Deliberately stricter than RFC 5321: what a sender should accept without cleaning.
VALID_EMAIL = re.compile(r"^[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@([A-Za-z0-9-]+\.)+[A-Za-z]{2,}$")
EXAMPLE_DOMAIN = re.compile(r"(^|\.)example\.(com|org|net)$", re.IGNORECASE)

MakeDb = Callable[[str], Engine]


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[MakeDb]:
    """Empty warehouses (SQLite files under ``tmp_path``), disposed afterwards."""
    engines: list[Engine] = []

    def make(name: str) -> Engine:
        engine = make_engine(f"sqlite:///{tmp_path / name}")
        schema.metadata.create_all(engine)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, SeedStats]]:
    """One default shop of 5,000 customers, shared by the read-only tests."""
    path = tmp_path_factory.mktemp("seed") / "shop.db"
    engine = make_engine(f"sqlite:///{path}")
    schema.metadata.create_all(engine)
    stats = seed_shop(engine, customers=5_000, seed=42, now=NOW)
    yield engine, stats
    engine.dispose()


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(t.c.id))]
            for t in SHOP_TABLES
        }


def count_candidates(engine: Engine, now: datetime) -> int:
    """The abandoned_cart rule in SQL: idle > 4 h and < 7 days, has items, no order."""
    has_items = select(cart_items.c.id).where(cart_items.c.cart_id == carts.c.id).exists()
    ordered = select(orders.c.id).where(orders.c.cart_id == carts.c.id).exists()
    query = (
        select(func.count())
        .select_from(carts)
        .where(
            carts.c.updated_at < now - timedelta(hours=4),
            carts.c.updated_at > now - timedelta(days=7),
            has_items,
            ~ordered,
        )
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def zone_countries() -> dict[str, set[str]]:
    """Timezones per ISO country, from the IANA database's own zone.tab."""
    text = importlib.resources.files("tzdata").joinpath("zoneinfo/zone.tab").read_text()
    zones: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            country, _, zone = line.split("\t")[:3]
            zones.setdefault(country, set()).add(zone)
    return zones


# --- determinism --------------------------------------------------------------------------


def test_same_inputs_write_identical_rows_and_another_seed_does_not(make_db: MakeDb) -> None:
    a, b, c = make_db("a.db"), make_db("b.db"), make_db("c.db")
    stats_a = seed_shop(a, customers=1_500, seed=7, now=NOW)
    stats_b = seed_shop(b, customers=1_500, seed=7, now=NOW)
    seed_shop(c, customers=1_500, seed=8, now=NOW)

    rows_a, rows_b, rows_c = dump(a), dump(b), dump(c)
    assert rows_a == rows_b
    assert replace(stats_a, seconds=0) == replace(stats_b, seconds=0)
    assert all(rows_a[t.name] for t in SHOP_TABLES)
    for name in ("customers", "products", "carts", "cart_items", "orders"):
        assert rows_a[name] != rows_c[name], name


def test_reseeding_replaces_the_shop_but_keeps_mailflow_tables(make_db: MakeDb) -> None:
    engine = make_db("shop.db")
    with engine.begin() as conn:
        conn.execute(
            insert(schema.suppressions),
            {"email": "x@example.com", "reason": "bounce", "created_at": NOW},
        )
    first = seed_shop(engine, customers=300, seed=1, now=NOW)
    rows = dump(engine)
    again = seed_shop(engine, customers=300, seed=1, now=NOW)

    assert dump(engine) == rows
    assert replace(first, seconds=0) == replace(again, seconds=0)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.suppressions)).scalar() == 1


def test_append_adds_a_second_shop_after_the_existing_ids(make_db: MakeDb) -> None:
    engine = make_db("shop.db")
    first = seed_shop(engine, customers=300, seed=1, now=NOW)
    second = seed_shop(engine, customers=200, seed=2, now=NOW, replace=False)

    with engine.connect() as conn:
        for t in SHOP_TABLES:
            expected = getattr(first, t.name) + getattr(second, t.name)
            assert conn.execute(select(func.count()).select_from(t)).scalar() == expected
            assert conn.execute(select(func.min(t.c.id))).scalar() == 1
            assert conn.execute(select(func.max(t.c.id))).scalar() == expected
    assert count_candidates(engine, NOW) == (
        first.abandoned_candidates + second.abandoned_candidates
    )


def test_default_now_is_the_current_utc_minute(make_db: MakeDb) -> None:
    def minute() -> datetime:
        return datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)

    engine = make_db("default.db")
    before = minute()
    seed_shop(engine, customers=200, seed=5)
    after = minute()

    rows = dump(engine)
    for i, now in enumerate(sorted({before, after})):
        explicit = make_db(f"explicit{i}.db")
        seed_shop(explicit, customers=200, seed=5, now=now)
        if dump(explicit) == rows:
            break
    else:
        pytest.fail("now=None did not match the current UTC minute")


def test_bad_input_is_refused_with_the_field_named(make_db: MakeDb) -> None:
    with pytest.raises(ValueError, match="customers"):
        seed_shop(make_db("shop.db"), customers=-1, now=NOW)
    with pytest.raises(ValueError, match="no_consent_rate"):
        SeedProfile(no_consent_rate=1.5)
    with pytest.raises(ValueError, match="idle_buckets"):
        SeedProfile(idle_buckets=((1.0, 10.0, 5.0),))


def test_zero_customers_still_writes_the_catalogue(make_db: MakeDb) -> None:
    stats = seed_shop(make_db("shop.db"), customers=0, now=NOW)
    assert (stats.customers, stats.carts, stats.orders, stats.abandoned_candidates) == (
        0,
        0,
        0,
        0,
    )
    assert stats.products == DEFAULT_PROFILE.products


# --- realistic dirt ---------------------------------------------------------------------------


def test_customer_dirt_comes_in_the_planned_shares(shop: tuple[Engine, SeedStats]) -> None:
    engine, stats = shop
    with engine.connect() as conn:
        rows = conn.execute(select(customers)).all()
    n = len(rows)
    assert n == stats.customers == 5_000

    emails = [r.email for r in rows]
    bad = [e for e in emails if e is None or not VALID_EMAIL.match(e)]
    assert 0.01 <= len(bad) / n <= 0.03
    assert None in bad and "" in bad
    assert any("@" not in e for e in bad if e)
    assert any(e.endswith("@localhost") for e in bad if e)
    assert any(not e.isascii() for e in bad if e)

    valid = [e for e in emails if e is not None and VALID_EMAIL.match(e)]
    assert all(EXAMPLE_DOMAIN.search(e.rpartition("@")[2]) for e in valid)
    by_lower = Counter(e.lower() for e in valid)
    shared = sum(k for k in by_lower.values() if k > 1)
    assert 0.01 <= shared / n <= 0.04  # ~1 % reuse an address, plus the owners they copy
    assert len({e for e in valid}) > len(by_lower)  # some repeats differ only in case

    names = [x for r in rows for x in (r.first_name, r.last_name) if x is not None]
    assert any(not x.isascii() for x in names)
    assert any(re.search(r"[\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]", x) for x in names)
    assert any(re.search(r"[\u0400-\u04ff]", x) for x in names)
    assert any(100 < len(x) <= 200 for x in names)
    assert 0 < sum(r.first_name is None for r in rows) < 0.03 * n

    locales = Counter(r.locale for r in rows)
    assert sum(locales[x] for x in ("en", "de", "fr", "es")) >= 0.99 * n
    unknown = n - sum(locales[x] for x in ("en", "de", "fr", "es"))
    assert 0 < unknown < 0.01 * n

    no_consent = sum(not r.marketing_consent for r in rows) / n
    assert 0.22 <= no_consent <= 0.28

    ltv = [r.lifetime_value for r in rows]
    assert all(isinstance(v, Decimal) and v >= 0 for v in ltv)
    assert 0.005 * n <= sum(v >= Decimal("1000.00") for v in ltv) <= 0.06 * n

    created = sorted(r.created_at for r in rows)
    assert created[-1] <= NOW
    assert created[-1] - created[0] >= timedelta(days=2 * 365)

    zones = zone_countries()
    known = zoneinfo.available_timezones()
    for r in rows:
        assert r.timezone in known
        if r.country is None:
            assert r.timezone == "UTC"
        else:
            assert r.timezone in zones[r.country], (r.country, r.timezone)


def test_catalogue_has_priced_products_with_example_images(
    shop: tuple[Engine, SeedStats],
) -> None:
    engine, stats = shop
    with engine.connect() as conn:
        rows = conn.execute(select(products)).all()
    assert len(rows) == stats.products == 200
    assert len({r.sku for r in rows}) == len(rows)
    assert all(r.name and r.price > 0 for r in rows)
    assert len({r.category for r in rows if r.category}) >= 5
    images = [r.image_url for r in rows if r.image_url is not None]
    assert len(images) >= 0.9 * len(rows)
    assert all(re.match(r"^https://([a-z0-9-]+\.)*example\.com/\S+$", u) for u in images)


# --- carts, orders and their integrity ----------------------------------------------------------


def test_every_reference_resolves(shop: tuple[Engine, SeedStats]) -> None:
    engine, _ = shop
    orphans = {
        "cart_items.cart_id": select(func.count())
        .select_from(cart_items.outerjoin(carts, cart_items.c.cart_id == carts.c.id))
        .where(carts.c.id.is_(None)),
        "cart_items.product_id": select(func.count())
        .select_from(cart_items.outerjoin(products, cart_items.c.product_id == products.c.id))
        .where(products.c.id.is_(None)),
        "carts.customer_id": select(func.count())
        .select_from(carts.outerjoin(customers, carts.c.customer_id == customers.c.id))
        .where(customers.c.id.is_(None)),
        "orders.customer_id": select(func.count())
        .select_from(orders.outerjoin(customers, orders.c.customer_id == customers.c.id))
        .where(customers.c.id.is_(None)),
        "orders.cart_id": select(func.count())
        .select_from(orders.outerjoin(carts, orders.c.cart_id == carts.c.id))
        .where(orders.c.cart_id.is_not(None), carts.c.id.is_(None)),
        "orders from another customer's cart": select(func.count())
        .select_from(orders.join(carts, orders.c.cart_id == carts.c.id))
        .where(orders.c.customer_id != carts.c.customer_id),
    }
    with engine.connect() as conn:
        assert {k: conn.execute(q).scalar() for k, q in orphans.items()} == dict.fromkeys(
            orphans, 0
        )


def test_timestamps_follow_the_story(shop: tuple[Engine, SeedStats]) -> None:
    engine, _ = shop
    with engine.connect() as conn:
        cart_rows = conn.execute(
            select(
                carts.c.created_at, carts.c.updated_at, customers.c.created_at.label("cust")
            ).join(customers, carts.c.customer_id == customers.c.id)
        ).all()
        order_rows = conn.execute(
            select(
                orders.c.created_at,
                orders.c.updated_at,
                orders.c.status,
                customers.c.created_at.label("cust"),
                carts.c.updated_at.label("cart_updated"),
            )
            .join(customers, orders.c.customer_id == customers.c.id)
            .outerjoin(carts, orders.c.cart_id == carts.c.id)
        ).all()
    assert cart_rows and order_rows
    for r in cart_rows:
        assert r.cust <= r.created_at <= r.updated_at <= NOW
    for o in order_rows:
        assert o.cust <= o.created_at <= o.updated_at <= NOW
        assert o.cart_updated is None or o.created_at > o.cart_updated
    statuses = Counter(o.status for o in order_rows)
    assert set(statuses) == {"placed", "shipped", "delivered", "cancelled"}


def test_carts_cover_the_window_edges_and_the_odd_cases(shop: tuple[Engine, SeedStats]) -> None:
    engine, stats = shop
    line_total = cart_items.c.quantity * cart_items.c.unit_price
    per_cart = (
        select(
            carts.c.id,
            carts.c.updated_at,
            func.count(cart_items.c.id).label("items"),
            func.coalesce(func.sum(line_total), 0).label("total"),
        )
        .outerjoin(cart_items, cart_items.c.cart_id == carts.c.id)
        .group_by(carts.c.id, carts.c.updated_at)
        .subquery()
    )
    with engine.connect() as conn:
        rows = conn.execute(select(per_cart)).all()
        converted = set(
            conn.execute(select(orders.c.cart_id).where(orders.c.cart_id.is_not(None))).scalars()
        )
        cart_orders = conn.execute(
            select(orders.c.total, per_cart.c.total.label("cart_total")).join(
                per_cart, orders.c.cart_id == per_cart.c.id
            )
        ).all()
        owners = conn.execute(select(func.count(func.distinct(carts.c.customer_id)))).scalar_one()
    assert len(rows) == stats.carts
    assert 0.3 * stats.customers <= owners <= 0.5 * stats.customers

    idle = [NOW - r.updated_at for r in rows]
    assert any(i < timedelta(hours=1) for i in idle)
    assert any(timedelta(hours=1) <= i <= timedelta(hours=3) for i in idle)
    assert any(timedelta(hours=4) < i < timedelta(hours=6) for i in idle)
    assert any(timedelta(days=1) <= i <= timedelta(days=6) for i in idle)
    assert any(timedelta(days=8) <= i <= timedelta(days=30) for i in idle)

    assert {r.items for r in rows} == {0, 1, 2, 3, 4, 5}
    assert 0 < sum(r.items == 0 for r in rows) < 0.06 * len(rows)
    zero_total = [r for r in rows if r.items > 0 and Decimal(str(r.total)) == 0]
    assert 0 < len(zero_total) < 0.02 * len(rows)

    with_items = [r for r in rows if r.items > 0]
    assert 0.25 <= len(converted) / len(with_items) <= 0.35
    assert all(r.items > 0 for r in rows if r.id in converted)
    assert all(o.total == Decimal(str(o.cart_total)).quantize(Decimal("0.01")) for o in cart_orders)
    assert stats.orders > len(converted)  # plus orders placed without a cart


def test_abandoned_candidates_equal_the_sql_count(shop: tuple[Engine, SeedStats]) -> None:
    engine, stats = shop
    assert stats.abandoned_candidates == count_candidates(engine, NOW)
    assert 0.08 * stats.customers <= stats.abandoned_candidates <= 0.2 * stats.customers


# --- the benchmark profile ----------------------------------------------------------------------


def test_bench_profile_makes_nearly_everyone_a_clean_candidate(make_db: MakeDb) -> None:
    engine = make_db("bench.db")
    n = 2_000
    stats = seed_shop(engine, customers=n, seed=3, now=NOW, profile=BENCH_PROFILE)

    assert stats.abandoned_candidates == count_candidates(engine, NOW)
    assert stats.abandoned_candidates >= 0.95 * n
    assert stats.carts == n
    with engine.connect() as conn:
        consenting = conn.execute(
            select(func.count()).select_from(customers).where(customers.c.marketing_consent)
        ).scalar_one()
        emails = list(conn.execute(select(customers.c.email)).scalars())
    assert consenting >= 0.95 * n
    valid = [e for e in emails if e is not None and VALID_EMAIL.match(e)]
    assert len(valid) >= 0.99 * n
    assert len({e.lower() for e in valid}) == len(valid)
