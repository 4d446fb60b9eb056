"""Trigger ``welcome``: customers who signed up since the watermark.

Event-based. The flow reads the trigger's watermark (``mf_watermarks``: the start of its
last clean run) and passes it as ``since``; this query scans sign-ups from ``since`` minus
``lookback_hours``, so rows that arrive in the warehouse late are still welcomed, and
never further back than ``max_age_days`` (a replay to an old date must not welcome the
whole customer base). With no watermark yet, the first run scans the lookback only.

Dedupe key ``welcome:<customer_id>``: one welcome per customer, ever, however often the
window is rescanned, replayed or scanned by two runs at once. Two accounts on one inbox
within ``cooldown`` get one welcome.

Transactional: a welcome right after sign-up is a relationship message about the account
just created, so it goes without marketing consent and carries no List-Unsubscribe header.
In exchange it carries no promotional content (no offers, no product picks): that is what
keeps it transactional. Hard bounces, bad-address drops and complaints still stop it (see
``mailflow.extract.MARKETING_ONLY_SUPPRESSIONS``). An unknown locale is not quarantined, as
it is for marketing mail: the renderer falls back to English and the customer is welcomed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Connection, String, cast, literal, select

from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.triggers.context import customer_context, shop_context
from mailflow.validation import recipient_suite
from mailflow.warehouse.schema import customers
from mailflow.watermarks import naive_utc

NAME = "welcome"


def scan_from(now: datetime, p: Mapping[str, Any]) -> datetime:
    """The earliest sign-up time this run looks at (see the module docstring)."""
    since = p.get("since")
    start = (now if since is None else naive_utc(since)) - timedelta(
        hours=float(p["lookback_hours"])
    )
    return max(start, now - timedelta(days=float(p["max_age_days"])))


def candidates(now: datetime, p: Mapping[str, Any]) -> Any:
    """Customers created at or after :func:`scan_from`."""
    return select(
        (literal(f"{NAME}:") + cast(customers.c.id, String)).label("dedupe_key"),
        customers.c.id.label("customer_id"),
        customers.c.email,
        customers.c.first_name,
        customers.c.locale,
        customers.c.marketing_consent,
        customers.c.created_at.label("signed_up_at"),
    ).where(customers.c.created_at >= scan_from(now, p))


def build_contexts(
    conn: Connection, frame: pd.DataFrame, shop: ContextDefaults
) -> list[dict[str, Any]]:
    """One render context per row: the customer, the shop and links to the account."""
    shop_ctx = shop_context(shop)
    links = {"account": f"{shop.shop_url}/account", "help": f"{shop.shop_url}/help"}
    return [
        {
            "customer": customer_context(row),
            "links": links,
            "shop": shop_ctx,
        }
        for row in frame.itertuples(index=False)
    ]


TRIGGER = Trigger(
    name=NAME,
    template=NAME,
    kind="transactional",
    candidates=candidates,
    # On an address two accounts share, the older account is welcomed.
    priority=(("signed_up_at", "asc"), ("customer_id", "asc")),
    suite=recipient_suite(NAME, locale_column=None),
    build_contexts=build_contexts,
    one_per_customer=True,
    cooldown=timedelta(days=7),
    defaults={"since": None, "lookback_hours": 6.0, "max_age_days": 3.0},
    max_delay=timedelta(days=2),
)
