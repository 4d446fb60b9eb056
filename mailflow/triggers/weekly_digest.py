"""Trigger ``weekly_digest``: a weekly personal summary at a fixed *local* time.

Time-based marketing. Each customer hears from us once a week at ``weekday`` ``hour``:00
in their own timezone (``customers.timezone``; default Monday 09:00). The flow runs
hourly; the timezone arithmetic happens here in Python (``zoneinfo``, DST included):
:func:`due_timezones` lists the IANA zones whose local time is inside the slot now, and the
query filters ``customers.timezone IN (…)`` — plain, dialect-neutral SQL.

``window_hours`` (default 1) is how long after the slot a zone stays due. With an hourly
schedule 1 is exact; a larger window lets a late or missed run catch up, and the dedupe
key makes the overlap harmless.

Dedupe key ``weekly_digest:<customer_id>:<ISO year-week of the slot, local>`` (e.g.
``weekly_digest:42:2026-W48``): one digest per customer and local week, however many
runs see them due. A DST change does not cause a second send: a local hour that happens
twice (autumn) is due twice with the same key; one that does not happen (spring, only
for an ``hour`` inside the jump, typically 02) is not due that week.

Invalid timezone names (not in the IANA database, e.g. ``'Mars/Olympus'``, ``''``,
``'europe/berlin'``) are *treated as UTC*: such customers get their digest at the UTC slot
rather than never, as mail platforms do for an unknown zone. The flow logs a warning
naming each invalid value and its count when they are sent, so the data can be fixed.

Content: up to three product picks (best sellers in the customer's favourite category,
then best sellers overall, never what is already in their cart) plus their open cart, if
any (with items, not ordered, touched within ``open_cart_days``).
"""

from __future__ import annotations

import zoneinfo
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal

import pandas as pd
from sqlalchemy import Connection, String, and_, case, cast, exists, func, literal, or_, select
from sqlalchemy.sql.elements import ColumnElement

from mailflow.errors import ConfigError
from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.triggers.context import (
    cart_lines,
    cart_totals,
    customer_context,
    int_or_none,
    money,
    shop_context,
)
from mailflow.validation import recipient_suite
from mailflow.warehouse.schema import cart_items, carts, customers, orders, products

NAME = "weekly_digest"

Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WEEKDAYS: tuple[Weekday, ...] = (
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
)

#: Product picks per digest.
PICKS = 3
_BESTSELLERS = 60
_CHUNK = 2_000


@lru_cache(maxsize=1)
def known_timezones() -> frozenset[str]:
    """Every IANA timezone name this process can load (the ``tzdata`` package provides them)."""
    return frozenset(zoneinfo.available_timezones() | {"UTC"})


def due_timezones(
    now: datetime, *, weekday: str, hour: int, window_hours: int = 1
) -> dict[str, str]:
    """Zones whose local time is within ``window_hours`` after ``weekday`` ``hour``:00, now.

    Args:
        now: the instant, naive UTC (or aware).
        weekday: ``"monday"`` … ``"sunday"``.
        hour: the local hour of the slot, 0-23.
        window_hours: how long the zone stays due after the slot starts, 1-24.

    Returns:
        Each due zone name → the ISO year-week of its slot in local time (``"2026-W48"``).

    Raises:
        ConfigError: a parameter is out of range; the message names it and the valid values.
    """
    if weekday not in WEEKDAYS:
        raise ConfigError(f"weekday {weekday!r} is not a day; use one of {', '.join(WEEKDAYS)}")
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise ConfigError(f"hour {hour!r} is not a local hour; use a whole number from 0 to 23")
    if isinstance(window_hours, bool) or not isinstance(window_hours, int):
        raise ConfigError(f"window_hours {window_hours!r} is not a whole number of hours")
    if not 1 <= window_hours <= 24:
        raise ConfigError(f"window_hours {window_hours!r} must be from 1 to 24")
    instant = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    target = WEEKDAYS.index(weekday)  # type: ignore[arg-type]  # checked above
    window = timedelta(hours=window_hours)
    due: dict[str, str] = {}
    for name in sorted(known_timezones()):
        # Wall-clock time there; the slot is the latest local `weekday hour:00` not after it.
        local = instant.astimezone(zoneinfo.ZoneInfo(name)).replace(tzinfo=None)
        day = local.date() - timedelta(days=(local.weekday() - target) % 7)
        slot = datetime.combine(day, time(hour))
        if slot > local:
            slot -= timedelta(days=7)
        if local - slot < window:
            year, week, _ = slot.isocalendar()
            due[name] = f"{year}-W{week:02d}"
    return due


def _week_and_filter(
    due: Mapping[str, str],
) -> tuple[ColumnElement[Any], ColumnElement[bool]]:
    """The digest week per row and the WHERE clause choosing due customers."""
    tz = customers.c.timezone
    where: ColumnElement[bool] = tz.in_(sorted(due))
    fallback = due.get("UTC")
    if fallback is not None:
        # Not an IANA name: treated as UTC, so due exactly when UTC is.
        where = or_(where, tz.not_in(sorted(known_timezones())))
    zones_by_week: dict[str, list[str]] = defaultdict(list)
    for zone, label in due.items():
        zones_by_week[label].append(zone)
    if len(zones_by_week) <= 1:
        only = next(iter(zones_by_week), fallback or "none")
        return literal(only, String), where
    # A window crossing Sunday midnight: zones on either side are in different weeks.
    week = case(
        *((tz.in_(sorted(zones)), label) for label, zones in sorted(zones_by_week.items())),
        else_=literal(fallback or "none", String),
    )
    return week, where


def candidates(now: datetime, p: Mapping[str, Any]) -> Any:
    """Customers whose local time is in the digest slot now, with their open cart if any."""
    due = due_timezones(
        now, weekday=p["weekday"], hour=int(p["hour"]), window_hours=int(p["window_hours"])
    )
    week, due_filter = _week_and_filter(due)
    open_carts = (
        select(
            carts.c.id.label("cart_id"),
            carts.c.customer_id,
            func.row_number()
            .over(
                partition_by=carts.c.customer_id,
                order_by=(carts.c.updated_at.desc(), carts.c.id.desc()),
            )
            .label("recency"),
        )
        .where(
            carts.c.updated_at >= now - timedelta(days=float(p["open_cart_days"])),
            exists().where(cart_items.c.cart_id == carts.c.id),
            ~exists().where(orders.c.cart_id == carts.c.id),
        )
        .subquery("open_carts")
    )
    totals = cart_totals()
    return (
        select(
            (literal(f"{NAME}:") + cast(customers.c.id, String) + literal(":") + week).label(
                "dedupe_key"
            ),
            customers.c.id.label("customer_id"),
            customers.c.email,
            customers.c.first_name,
            customers.c.locale,
            customers.c.timezone,
            customers.c.marketing_consent,
            week.label("digest_week"),
            open_carts.c.cart_id.label("open_cart_id"),
            totals.c.cart_total,
            totals.c.item_count.label("cart_item_count"),
        )
        .select_from(customers)
        .outerjoin(
            open_carts,
            and_(open_carts.c.customer_id == customers.c.id, open_carts.c.recency == 1),
        )
        .outerjoin(totals, totals.c.cart_id == open_carts.c.cart_id)
        .where(due_filter)
    )


def invalid_timezones(conn: Connection) -> dict[str, int]:
    """Customers per ``timezone`` value that is not an IANA name (they are sent as UTC)."""
    tz = customers.c.timezone
    rows = conn.execute(
        select(tz, func.count())
        .where(tz.not_in(sorted(known_timezones())))
        .group_by(tz)
        .order_by(func.count().desc(), tz)
    )
    return {str(name): int(n) for name, n in rows}


# --- render contexts -----------------------------------------------------------------------


def _bestsellers(conn: Connection) -> list[dict[str, Any]]:
    """The most carted priced products, best first."""
    qty = func.sum(cart_items.c.quantity).label("qty")
    rows = conn.execute(
        select(
            products.c.id,
            products.c.name,
            products.c.category,
            products.c.price,
            products.c.image_url,
        )
        .join(cart_items, cart_items.c.product_id == products.c.id)
        .where(products.c.price > 0)
        .group_by(
            products.c.id,
            products.c.name,
            products.c.category,
            products.c.price,
            products.c.image_url,
        )
        .order_by(qty.desc(), products.c.id)
        .limit(_BESTSELLERS)
    )
    return [
        {"id": int(i), "name": n, "category": c, "price": p, "image_url": img}
        for i, n, c, p, img in rows
    ]


def _favourite_categories(conn: Connection, customer_ids: list[int]) -> dict[int, str]:
    """The category each customer has put the most items of in carts."""
    score: dict[int, Counter[str]] = defaultdict(Counter)
    stmt = (
        select(carts.c.customer_id, products.c.category, func.sum(cart_items.c.quantity))
        .join(cart_items, cart_items.c.cart_id == carts.c.id)
        .join(products, products.c.id == cart_items.c.product_id)
        .where(products.c.category.is_not(None))
        .group_by(carts.c.customer_id, products.c.category)
    )
    for start in range(0, len(customer_ids), _CHUNK):
        part = customer_ids[start : start + _CHUNK]
        for customer_id, category, n in conn.execute(stmt.where(carts.c.customer_id.in_(part))):
            score[int(customer_id)][category] += int(n)
    # Ties go to the alphabetically first category, so a rerun picks the same.
    return {c: min(s.items(), key=lambda kv: (-kv[1], kv[0]))[0] for c, s in score.items()}


def _picks(
    favourite: str | None, bestsellers: list[dict[str, Any]], in_cart: set[int]
) -> list[dict[str, Any]]:
    first = [b for b in bestsellers if favourite is not None and b["category"] == favourite]
    chosen: list[dict[str, Any]] = []
    for b in (*first, *bestsellers):
        if len(chosen) == PICKS:
            break
        if b["id"] not in in_cart and all(c["id"] != b["id"] for c in chosen):
            chosen.append(b)
    return chosen


def build_contexts(
    conn: Connection, frame: pd.DataFrame, shop: ContextDefaults
) -> list[dict[str, Any]]:
    """One render context per row: the customer, their picks, their open cart, the shop."""
    customer_ids = [int(x) for x in frame["customer_id"].tolist()]
    cart_ids = sorted(
        {c for c in (int_or_none(v) for v in frame["open_cart_id"].tolist()) if c is not None}
    )
    items = cart_lines(conn, cart_ids)
    favourites = _favourite_categories(conn, customer_ids) if customer_ids else {}
    bestsellers = _bestsellers(conn) if customer_ids else []
    shop_ctx = shop_context(shop)
    contexts = []
    for row in frame.itertuples(index=False):
        customer_id = int(row.customer_id)
        cart_id = int_or_none(row.open_cart_id)
        lines = items.get(cart_id, []) if cart_id is not None else []
        cart = None
        if cart_id is not None and lines:
            cart = {
                "id": cart_id,
                "url": f"{shop.shop_url}/cart/{cart_id}",
                "total": money(row.cart_total),
                "currency": "USD",
                "item_count": int(row.cart_item_count),
                "items": [{k: v for k, v in x.items() if k != "product_id"} for x in lines],
            }
        picks = _picks(favourites.get(customer_id), bestsellers, {x["product_id"] for x in lines})
        contexts.append(
            {
                "customer": customer_context(row),
                "week": row.digest_week,
                "picks": [
                    {
                        "name": b["name"],
                        "price": money(b["price"]),
                        "currency": "USD",
                        "url": f"{shop.shop_url}/products/{b['id']}",
                        "image_url": b["image_url"],
                    }
                    for b in picks
                ],
                "cart": cart,
                "shop": shop_ctx,
            }
        )
    return contexts


TRIGGER = Trigger(
    name=NAME,
    template=NAME,
    kind="marketing",
    candidates=candidates,
    # On an address two customers share, the older customer record gets the digest.
    priority=(("customer_id", "asc"),),
    suite=recipient_suite(NAME),
    build_contexts=build_contexts,
    one_per_customer=True,
    # The week key already allows one digest per customer and week; the cooldown also
    # keeps a second customer record on the same inbox from getting its own copy.
    cooldown=timedelta(days=5),
    defaults={"weekday": "monday", "hour": 9, "window_hours": 1, "open_cart_days": 14.0},
    # Monday's digest on Monday evening at the latest; its slot is a time, not a condition.
    max_delay=timedelta(hours=12),
)
