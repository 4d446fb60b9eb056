"""Small, exact customer bases for campaign tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, insert

from mailflow.clock import utcnow
from mailflow.warehouse.schema import customers, orders


@dataclass
class Person:
    email: str | None
    country: str = "DE"
    locale: str = "de"
    timezone: str = "Europe/Berlin"
    consent: bool = True
    lifetime_value: str = "200.00"
    first_name: str | None = "Ann"
    ordered_days_ago: float | None = None
    created_days_ago: float = 100


def add_people(engine: Engine, people: list[Person], *, first_id: int = 1) -> list[int]:
    """Insert customers (and one order each where asked); returns their ids."""
    now = utcnow()
    ids = []
    with engine.begin() as conn:
        for n, p in enumerate(people, first_id):
            conn.execute(
                insert(customers).values(
                    id=n,
                    email=p.email,
                    first_name=p.first_name,
                    locale=p.locale,
                    timezone=p.timezone,
                    country=p.country,
                    marketing_consent=p.consent,
                    lifetime_value=Decimal(p.lifetime_value),
                    created_at=now - timedelta(days=p.created_days_ago),
                )
            )
            if p.ordered_days_ago is not None:
                add_order(engine, n, now - timedelta(days=p.ordered_days_ago), conn=conn)
            ids.append(n)
    return ids


_order_ids = iter(range(1_000_000, 2_000_000))


def add_order(
    engine: Engine, customer_id: int, at: datetime, *, conn=None, status: str = "placed"
) -> None:  # type: ignore[no-untyped-def]
    values = {
        "id": next(_order_ids),
        "customer_id": customer_id,
        "status": status,
        "total": Decimal("25.00"),
        "created_at": at,
        "updated_at": at,
    }
    if conn is not None:
        conn.execute(insert(orders).values(**values))
        return
    with engine.begin() as c:
        c.execute(insert(orders).values(**values))
