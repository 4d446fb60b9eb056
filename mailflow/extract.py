"""Extraction: who should hear from us now, with every exclusion counted by reason.

Exclusions happen in SQL, so excluded rows never leave the warehouse; a GROUP BY over
the same reason expression says how many were excluded and why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Select, case, exists, false, func, literal, null, or_, select
from sqlalchemy.sql.elements import ColumnElement

from mailflow import ledger
from mailflow.triggers.base import Trigger
from mailflow.warehouse.schema import campaigns, suppressions

#: Suppression reasons that opt an address out of marketing only. Transactional mail (an
#: order update, a welcome after sign-up) still goes to such an address: the customer said
#: "no more promotions", not "do not tell me my parcel shipped". Every other reason — hard
#: bounces (``bounce``), drops for a bad address (``dropped``), spam complaints
#: (``spamreport``) and any manual entry — stops transactional mail too: the address is dead
#: or the recipient treats us as spam, and sending anyway hurts every sender's reputation.
MARKETING_ONLY_SUPPRESSIONS = ("unsubscribe", "group_unsubscribe")

EXCLUSION_REASONS = (
    "already_notified",
    "recently_notified",
    "suppressed",
    "no_consent",
    "frequency_capped",
    "superseded",
)

#: The frequency cap's rolling window: at most ``Settings.frequency_cap`` marketing
#: messages per customer within it, across every flow (triggers and campaigns).
FREQUENCY_WINDOW = timedelta(days=7)


def recent_marketing_count(customer_id: Any, now: datetime) -> Any:
    """Marketing messages planned or sent to ``customer_id`` in the window (scalar subquery).

    Marketing means a registered trigger of kind ``marketing`` or a campaign stored as
    ``marketing`` in ``mf_campaigns``; transactional messages never count.
    """
    from mailflow.triggers import registry

    names = sorted(t.name for t in registry().values() if t.kind == "marketing")
    marketing_campaigns = select(campaigns.c.trigger).where(campaigns.c.kind == "marketing")
    return ledger.marketing_count_since(
        customer_id,
        now - FREQUENCY_WINDOW,
        marketing=lambda trigger: or_(trigger.in_(names), trigger.in_(marketing_campaigns)),
    )


@dataclass(frozen=True)
class ExtractQueries:
    """The two statements of one extraction."""

    counts: Select[Any]  # (reason, n) for every candidate, reason NULL = eligible
    eligible: Select[Any]  # the eligible rows, in priority order


def build_queries(
    trigger: Trigger, now: datetime, params: Mapping[str, Any], *, frequency_cap: int
) -> ExtractQueries:
    """Wrap the trigger's candidate query with the shared exclusion rules.

    ``frequency_cap``: at most this many marketing messages per customer in
    :data:`FREQUENCY_WINDOW` (0 = no cap; transactional triggers are never capped).
    """
    base = trigger.candidates(now, params).subquery("candidates")
    c = base.c
    order = [c[name].desc() if way == "desc" else c[name].asc() for name, way in trigger.priority]

    if trigger.one_per_customer:
        rank: ColumnElement[Any] = func.row_number().over(
            partition_by=c.customer_id, order_by=order
        )
    else:
        rank = literal(1)
    ranked = select(base, rank.label("customer_rank")).subquery("ranked")
    r = ranked.c

    whens: list[tuple[ColumnElement[bool], str]] = [
        (ledger.already_notified(r.dedupe_key), "already_notified"),
    ]
    if trigger.cooldown is not None:
        since = now - trigger.cooldown
        # By customer, and by address: two customer records can share one inbox.
        whens.append(
            (
                ledger.notified_since(trigger.name, since, customer_id=r.customer_id),
                "recently_notified",
            )
        )
        whens.append(
            (
                ledger.notified_since(trigger.name, since, email=func.lower(func.trim(r.email))),
                "recently_notified",
            )
        )
    suppressed = [suppressions.c.email == func.lower(func.trim(r.email))]
    if trigger.kind != "marketing":
        suppressed.append(suppressions.c.reason.not_in(MARKETING_ONLY_SUPPRESSIONS))
    whens.append((exists().where(*suppressed), "suppressed"))
    if trigger.kind == "marketing":
        whens.append((r.marketing_consent == false(), "no_consent"))
        if frequency_cap > 0:
            whens.append(
                (recent_marketing_count(r.customer_id, now) >= frequency_cap, "frequency_capped")
            )
    whens.append((r.customer_rank > 1, "superseded"))
    reason = case(*whens, else_=null()).label("exclusion")

    with_reason = select(ranked, reason).subquery("screened")
    s = with_reason.c
    counts = select(s.exclusion, func.count().label("n")).group_by(s.exclusion)
    keep = [col for col in s if col.name not in ("exclusion", "customer_rank")]
    ranked_order = [
        s[name].desc() if way == "desc" else s[name].asc() for name, way in trigger.priority
    ]
    eligible = select(*keep).where(s.exclusion.is_(None)).order_by(*ranked_order, s.dedupe_key)
    return ExtractQueries(counts=counts, eligible=eligible)


@dataclass
class Extracted:
    """The eligible rows and the tally of what was found and left out."""

    frame: pd.DataFrame
    found: int
    excluded: dict[str, int]


def count(conn: Connection, queries: ExtractQueries) -> tuple[int, dict[str, int]]:
    """How many candidates were found, and how many were excluded by reason."""
    excluded: dict[str, int] = {}
    found = 0
    for reason, n in conn.execute(queries.counts):
        found += n
        if reason is not None:
            excluded[reason] = n
    return found, excluded


def eligible_chunks(conn: Connection, queries: ExtractQueries, size: int) -> Iterator[pd.DataFrame]:
    """The eligible rows in priority order, ``size`` at a time, read as they are needed.

    The warehouse streams the result (a server-side cursor on PostgreSQL; SQLite steps
    through it), so only one chunk is in memory at a time. An empty result yields one
    empty frame with the query's columns.
    """
    result = conn.execution_options(stream_results=True, yield_per=size).execute(queries.eligible)
    cols = list(result.keys())
    empty = True
    for part in result.partitions(size):
        empty = False
        # Plain tuples: pandas inspects each Row object otherwise, 5× slower.
        yield pd.DataFrame.from_records([tuple(row) for row in part], columns=cols)
    if empty:
        yield pd.DataFrame(columns=cols)


def extract(
    conn: Connection,
    trigger: Trigger,
    *,
    now: datetime,
    params: Mapping[str, Any],
    frequency_cap: int,
    chunk_size: int = 20_000,
) -> Extracted:
    """Run the trigger's query; returns eligible rows plus counts by exclusion reason."""
    queries = build_queries(trigger, now, params, frequency_cap=frequency_cap)
    found, excluded = count(conn, queries)
    frame = pd.concat(list(eligible_chunks(conn, queries, chunk_size)), ignore_index=True)
    return Extracted(frame=frame, found=found, excluded=excluded)
