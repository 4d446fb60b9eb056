"""Demo only: some reminded shoppers come back and buy, so conversions have something to count.

In production the shop writes its own orders; the synthetic shop has none after the
demo's send, so without this step the conversion columns of the demo would be zero.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Engine, func, insert, select

from mailflow.clock import utcnow
from mailflow.ledger import Status
from mailflow.warehouse.schema import cart_items, events, orders, send_ledger


@dataclass(frozen=True, slots=True)
class Returns:
    orders: int
    revenue: Decimal


def shoppers_return(
    engine: Engine,
    *,
    seed: int = 42,
    clicked_share: float = 0.4,
    other_share: float = 0.01,
) -> Returns:
    """Order the reminded carts of ``clicked_share`` of clickers and ``other_share`` of the rest.

    Each order is placed now (after the reminder), from the reminded cart, at the
    cart's value.
    """
    rng = random.Random(seed)
    with engine.begin() as conn:
        clicked = set(
            conn.execute(
                select(events.c.ledger_id).distinct().where(events.c.event == "click")
            ).scalars()
        )
        sent = conn.execute(
            select(send_ledger.c.id, send_ledger.c.customer_id, send_ledger.c.dedupe_key).where(
                send_ledger.c.trigger == "abandoned_cart", send_ledger.c.status == Status.SENT
            )
        ).all()
        chosen = [
            row
            for row in sent
            if rng.random() < (clicked_share if row.id in clicked else other_share)
        ]
        cart_ids = [int(row.dedupe_key.rsplit(":", 1)[1]) for row in chosen]
        totals = dict(
            conn.execute(
                select(
                    cart_items.c.cart_id, func.sum(cart_items.c.quantity * cart_items.c.unit_price)
                )
                .where(cart_items.c.cart_id.in_(cart_ids))
                .group_by(cart_items.c.cart_id)
            ).all()
        )
        now = utcnow()
        rows = [
            {
                "customer_id": row.customer_id,
                "cart_id": cart_id,
                "status": "placed",
                "total": Decimal(totals.get(cart_id) or 0).quantize(Decimal("0.01")),
                "created_at": now,
                "updated_at": now,
            }
            for row, cart_id in zip(chosen, cart_ids, strict=True)
        ]
        if rows:
            conn.execute(insert(orders), rows)
    return Returns(orders=len(rows), revenue=sum((r["total"] for r in rows), Decimal(0)))
