"""Trigger ``order_status``: an order was shipped or delivered.

Reads the shop's status history (``order_status_history``: one row per change), not
``orders.status``: the history says *when* each change happened, so a run that was late
or down still finds every change in its window, and a shipped order that is delivered
before the next run gets both messages — unless the delivery is already known, in which
case the stale "on its way" message is skipped and only "delivered" goes.

Dedupe key ``order_status:<order_id>:<status>``: one message per order and status, ever
(a repeated history row, a status set twice, a rerun: all the same key).

Transactional: sent without marketing consent, without a List-Unsubscribe header and
without cooldown or frequency cap — a customer with three orders shipped today gets three
notices, on a shared inbox too. Hard bounces, bad-address drops and spam complaints still
stop it; a marketing unsubscribe does not (``mailflow.extract.MARKETING_ONLY_SUPPRESSIONS``).
An unknown locale falls back to English rather than holding a shipping notice back.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Connection, String, and_, cast, func, literal, select

from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.triggers.context import cart_lines, customer_context, int_or_none, money, shop_context
from mailflow.validation import MAX_FIRST_NAME_CHARS, Rule, Suite
from mailflow.warehouse.schema import customers, order_status_history, orders

NAME = "order_status"

#: The changes customers hear about. Adding one (e.g. ``out_for_delivery``) needs its words
#: in every locale of ``templates/order_status``.
STATUSES: tuple[str, ...] = ("shipped", "delivered")


def candidates(now: datetime, p: Mapping[str, Any]) -> Any:
    """Orders that became shipped or delivered within the last ``max_age_hours``."""
    h = order_status_history
    changes = (
        select(
            h.c.order_id,
            h.c.status,
            # A change recorded twice is one change: the first time it happened.
            func.min(h.c.changed_at).label("changed_at"),
        )
        .where(
            h.c.status.in_(STATUSES),
            h.c.changed_at >= now - timedelta(hours=float(p["max_age_hours"])),
        )
        .group_by(h.c.order_id, h.c.status)
        .subquery("changes")
    )
    delivered = order_status_history.alias("delivered")
    already_delivered = (
        select(delivered.c.id)
        .where(delivered.c.order_id == changes.c.order_id, delivered.c.status == "delivered")
        .exists()
    )
    return (
        select(
            (
                literal(f"{NAME}:")
                + cast(changes.c.order_id, String)
                + literal(":")
                + changes.c.status
            ).label("dedupe_key"),
            customers.c.id.label("customer_id"),
            customers.c.email,
            customers.c.first_name,
            customers.c.locale,
            customers.c.marketing_consent,
            changes.c.order_id,
            changes.c.status,
            changes.c.changed_at,
            orders.c.total.label("order_total"),
            orders.c.cart_id.label("order_cart_id"),
            orders.c.created_at.label("ordered_at"),
        )
        .select_from(changes)
        .join(orders, orders.c.id == changes.c.order_id)
        .join(customers, customers.c.id == orders.c.customer_id)
        # "On its way" after the parcel arrived is noise: only "delivered" goes then.
        .where(~and_(changes.c.status == "shipped", already_delivered))
        # A cancelled order gets no "shipped" or "delivered" mail (the history may lag).
        .where(orders.c.status != "cancelled")
    )


def build_contexts(
    conn: Connection, frame: pd.DataFrame, shop: ContextDefaults
) -> list[dict[str, Any]]:
    """One render context per row: the customer, the order (with its lines when known)."""
    cart_ids = sorted(
        {c for c in (int_or_none(v) for v in frame["order_cart_id"].tolist()) if c is not None}
    )
    lines = cart_lines(conn, cart_ids)
    shop_ctx = shop_context(shop)
    contexts = []
    for row in frame.itertuples(index=False):
        order_id = int(row.order_id)
        cart_id = int_or_none(row.order_cart_id)
        contexts.append(
            {
                "customer": customer_context(row),
                "order": {
                    "id": order_id,
                    "status": row.status,
                    "total": money(row.order_total),
                    "currency": "USD",
                    "url": f"{shop.shop_url}/orders/{order_id}",
                    "items": lines.get(cart_id, []) if cart_id is not None else [],
                },
                "shop": shop_ctx,
            }
        )
    return contexts


TRIGGER = Trigger(
    name=NAME,
    template=NAME,
    kind="transactional",
    candidates=candidates,
    priority=(("changed_at", "asc"), ("order_id", "asc")),
    # Not recipient_suite: it allows one message per address per run, and a customer
    # with two orders shipped today must get both notices.
    suite=Suite(
        NAME,
        (
            Rule.not_null("email"),
            Rule.email("email"),
            Rule.length_between("first_name", None, MAX_FIRST_NAME_CHARS),
            Rule.in_set("status", STATUSES),
        ),
    ),
    build_contexts=build_contexts,
    one_per_customer=False,
    cooldown=None,
    defaults={"max_age_hours": 72.0},
    max_delay=timedelta(days=2),
    recheck_condition=True,
    stale_reason="the order was cancelled, or a shipped order was delivered meanwhile",
)
