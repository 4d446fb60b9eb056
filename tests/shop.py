"""Build small, exact shops for tests (the synthetic seeder is for volume)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, func, insert, select

from mailflow.clock import utcnow
from mailflow.warehouse.schema import (
    cart_items,
    carts,
    customers,
    order_status_history,
    orders,
    products,
)


@dataclass
class Shopper:
    """One customer with one cart idle for ``idle_hours``."""

    email: str | None
    first_name: str | None = "Ann"
    locale: str = "en"
    consent: bool = True
    lifetime_value: str = "120.00"
    idle_hours: float = 6.0
    items: list[tuple[int, int, str]] = field(default_factory=lambda: [(1, 2, "19.90")])
    ordered: bool = False


def build_shop(engine: Engine, shoppers: list[Shopper], *, first_id: int = 1) -> dict[str, int]:
    """Insert the shoppers and their carts (and the products, the first time).

    Customer and cart ids start at ``first_id``, so a test can add shoppers later.
    Returns the cart id by email.
    """
    now = utcnow()
    cart_of: dict[str, int] = {}
    with engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(products)).scalar_one() == 0:
            conn.execute(
                insert(products),
                [
                    {
                        "id": i,
                        "sku": f"SKU-{i}",
                        "name": f"Product {i}",
                        "category": "test",
                        "price": Decimal("19.90"),
                        "image_url": f"https://shop.example.com/img/{i}.jpg",
                    }
                    for i in range(1, 4)
                ],
            )
        rows: dict[Any, list[dict[str, Any]]] = {
            customers: [],
            carts: [],
            cart_items: [],
            orders: [],
        }
        for n, s in enumerate(shoppers, first_id):
            rows[customers].append(
                {
                    "id": n,
                    "email": s.email,
                    "first_name": s.first_name,
                    "locale": s.locale,
                    "timezone": "UTC",
                    "country": "US",
                    "marketing_consent": s.consent,
                    "lifetime_value": Decimal(s.lifetime_value),
                    "created_at": now - timedelta(days=100),
                }
            )
            at = now - timedelta(hours=s.idle_hours)
            rows[carts].append({"id": n, "customer_id": n, "created_at": at, "updated_at": at})
            rows[cart_items] += [
                {"cart_id": n, "product_id": pid, "quantity": qty, "unit_price": Decimal(price)}
                for pid, qty, price in s.items
            ]
            if s.ordered:
                rows[orders].append(
                    {
                        "id": n,
                        "customer_id": n,
                        "cart_id": n,
                        "status": "placed",
                        "total": Decimal("10"),
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            cart_of[s.email or f"<none {n}>"] = n
        # One executemany per table: a 10,000-shopper shop in well under a second.
        for table, values in rows.items():
            if values:
                conn.execute(insert(table), values)
    return cart_of


@dataclass
class Customer:
    """One customer without a cart, who signed up ``signed_up_hours_ago``."""

    email: str | None
    first_name: str | None = "Ann"
    locale: str = "en"
    consent: bool = True
    timezone: str = "UTC"
    signed_up_hours_ago: float = 1.0


def add_customers(engine: Engine, people: list[Customer], *, first_id: int = 1) -> dict[str, int]:
    """Insert the customers with ids from ``first_id``; returns the customer id by email."""
    now = utcnow()
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for n, c in enumerate(people, first_id):
            conn.execute(
                insert(customers).values(
                    id=n,
                    email=c.email,
                    first_name=c.first_name,
                    locale=c.locale,
                    timezone=c.timezone,
                    country=None,
                    marketing_consent=c.consent,
                    lifetime_value=Decimal("0"),
                    created_at=now - timedelta(hours=c.signed_up_hours_ago),
                )
            )
            ids[c.email or f"<none {n}>"] = n
    return ids


def add_order(
    engine: Engine,
    *,
    order_id: int,
    customer_id: int,
    changes: list[tuple[str, float]],
    total: str = "42.00",
    cart_id: int | None = None,
) -> None:
    """An order with its status history: ``(status, hours_ago)`` per change, oldest first.

    The order is created at the first change; ``orders.status`` is the last one.
    """
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(orders).values(
                id=order_id,
                customer_id=customer_id,
                cart_id=cart_id,
                status=changes[-1][0],
                total=Decimal(total),
                created_at=now - timedelta(hours=changes[0][1]),
                updated_at=now - timedelta(hours=changes[-1][1]),
            )
        )
        conn.execute(
            insert(order_status_history),
            [
                {"order_id": order_id, "status": st, "changed_at": now - timedelta(hours=h)}
                for st, h in changes
            ],
        )


def add_status_changes(engine: Engine, order_id: int, changes: list[tuple[str, float]]) -> None:
    """Record further status changes ``(status, hours_ago)`` of an existing order."""
    now = utcnow()
    with engine.begin() as conn:
        for status, hours_ago in changes:
            conn.execute(
                insert(order_status_history).values(
                    order_id=order_id, status=status, changed_at=now - timedelta(hours=hours_ago)
                )
            )
