"""Trigger ``abandoned_cart``: a cart idle for a while, with items, never ordered.

Dedupe key ``abandoned_cart:<cart_id>``: one reminder per cart, ever. A customer
with several idle carts hears about the most recent one only, and not again for
``cooldown``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
from sqlalchemy import Connection, String, cast, exists, literal, select

from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.triggers.context import (
    cart_lines,
    cart_totals,
    customer_context,
    money,
    shop_context,
)
from mailflow.validation import Rule, recipient_suite
from mailflow.warehouse.schema import carts, customers, orders

NAME = "abandoned_cart"


def candidates(now: datetime, p: Mapping[str, Any]) -> Any:
    """Carts idle longer than ``idle_hours`` but not older than ``max_age_days``."""
    totals = cart_totals()
    idle_before = now - timedelta(hours=float(p["idle_hours"]))
    not_before = now - timedelta(days=float(p["max_age_days"]))
    return (
        select(
            (literal(f"{NAME}:") + cast(carts.c.id, String)).label("dedupe_key"),
            customers.c.id.label("customer_id"),
            customers.c.email,
            customers.c.first_name,
            customers.c.locale,
            customers.c.timezone,
            customers.c.marketing_consent,
            customers.c.lifetime_value,
            carts.c.id.label("cart_id"),
            carts.c.updated_at.label("cart_updated_at"),
            totals.c.cart_total,
            totals.c.item_count,
        )
        .select_from(carts)
        .join(customers, customers.c.id == carts.c.customer_id)
        # Inner join: a cart without items has nothing to remind anyone of.
        .join(totals, totals.c.cart_id == carts.c.id)
        .where(
            carts.c.updated_at < idle_before,
            carts.c.updated_at >= not_before,
            ~exists().where(orders.c.cart_id == carts.c.id),
        )
    )


def build_contexts(
    conn: Connection, frame: pd.DataFrame, shop: ContextDefaults
) -> list[dict[str, Any]]:
    """One render context per row: the customer, the cart with its items, the shop."""
    lines = cart_lines(conn, [int(x) for x in frame["cart_id"].tolist()])
    shop_ctx = shop_context(shop)
    contexts = []
    for row in frame.itertuples(index=False):
        cart_id = int(row.cart_id)
        contexts.append(
            {
                "customer": customer_context(row, lifetime_value=money(row.lifetime_value)),
                "cart": {
                    "id": cart_id,
                    "url": f"{shop.shop_url}/cart/{cart_id}",
                    "total": money(row.cart_total),
                    "currency": "USD",
                    "item_count": int(row.item_count),
                    "items": lines.get(cart_id, []),
                },
                "shop": shop_ctx,
            }
        )
    return contexts


def variant(row: Mapping[str, Any], p: Mapping[str, Any]) -> str | None:
    """``vip`` for customers whose lifetime value reaches the threshold."""
    return (
        "vip" if Decimal(str(row["lifetime_value"])) >= Decimal(str(p["vip_threshold"])) else None
    )


TRIGGER = Trigger(
    name=NAME,
    template=NAME,
    kind="marketing",
    candidates=candidates,
    priority=(("cart_updated_at", "desc"), ("cart_id", "desc")),
    suite=recipient_suite(NAME, extra=(Rule.greater_than("cart_total", 0),)),
    build_contexts=build_contexts,
    variant=variant,
    one_per_customer=True,
    cooldown=timedelta(days=7),
    defaults={"idle_hours": 4.0, "max_age_days": 7.0, "vip_threshold": 1000.0},
    # A reminder a day late, after the customer bought, is worse than none.
    max_delay=timedelta(days=1),
    recheck_condition=True,
    stale_reason="the cart became an order, was emptied, or is in use again",
)
