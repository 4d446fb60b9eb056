"""Pieces that every trigger builds the same way: cart queries and render contexts.

A trigger's ``build_contexts`` turns extracted rows into template contexts; the shop,
the customer, money and cart lines look the same in every template, so they are made
here once, as is the per-cart totals query their candidate queries join.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Subquery, func, select

from mailflow.triggers.base import ContextDefaults
from mailflow.warehouse.schema import cart_items, products

#: Cart ids per ``IN`` list when fetching cart lines.
CHUNK = 2_000


def cart_totals() -> Subquery:
    """Per cart: ``cart_id``, ``cart_total`` (sum of quantity x unit price), ``item_count``."""
    return (
        select(
            cart_items.c.cart_id,
            func.sum(cart_items.c.quantity * cart_items.c.unit_price).label("cart_total"),
            func.sum(cart_items.c.quantity).label("item_count"),
        )
        .group_by(cart_items.c.cart_id)
        .subquery("totals")
    )


def money(value: Any) -> str:
    """``value`` as a string with two decimals (``"19.90"``), as templates show it."""
    return f"{Decimal(str(value)).quantize(Decimal('0.01'))}"


def int_or_none(value: Any) -> int | None:
    """An int, or ``None`` for SQL NULL (``None``/``NaN`` in a frame)."""
    return None if value is None or pd.isna(value) else int(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text_or_none(value: Any) -> str | None:
    """A string, or ``None`` for SQL NULL (``None``/``NaN`` in a frame)."""
    return value if isinstance(value, str) else None


def shop_context(shop: ContextDefaults) -> dict[str, str]:
    """``shop`` in every template: name, url, support_email, address."""
    return {
        "name": shop.shop_name,
        "url": shop.shop_url,
        "support_email": shop.support_email,
        "address": shop.shop_address,
    }


def first_name_or_none(value: Any) -> str | None:
    """The first name on one line (control characters and runs of whitespace become one
    space, the ends trimmed), or None when nothing is left, so templates'
    ``{% if customer.first_name %}`` picks the greeting without a name."""
    name = text_or_none(value)
    if name is None:
        return None
    return " ".join(_CONTROL.sub(" ", name).split()) or None


def customer_context(row: Any, **extra: Any) -> dict[str, Any]:
    """``customer`` in every template: id, first name (or None), email, locale, ``extra``."""
    return {
        "id": int(row.customer_id),
        "first_name": first_name_or_none(row.first_name),
        "email": row.email,
        "locale": row.locale,
        **extra,
    }


def cart_lines(conn: Connection, cart_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The lines of each cart, in the order they were added.

    Each line: ``product_id``, ``name``, ``image_url``, ``quantity``, ``unit_price`` and
    ``line_total`` (money strings).
    """
    lines: dict[int, list[dict[str, Any]]] = {}
    stmt = (
        select(
            cart_items.c.cart_id,
            products.c.id,
            products.c.name,
            products.c.image_url,
            cart_items.c.quantity,
            cart_items.c.unit_price,
        )
        .join(products, products.c.id == cart_items.c.product_id)
        .order_by(cart_items.c.cart_id, cart_items.c.id)
    )
    for start in range(0, len(cart_ids), CHUNK):
        part = cart_ids[start : start + CHUNK]
        for cart_id, product_id, name, image_url, qty, price in conn.execute(
            stmt.where(cart_items.c.cart_id.in_(part))
        ):
            lines.setdefault(int(cart_id), []).append(
                {
                    "product_id": int(product_id),
                    "name": name,
                    "image_url": image_url,
                    "quantity": int(qty),
                    "unit_price": money(price),
                    "line_total": money(Decimal(str(price)) * int(qty)),
                }
            )
    return lines
