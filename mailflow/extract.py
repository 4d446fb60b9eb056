"""Extraction: who should hear from us now, with every exclusion counted by reason.

Exclusions happen in SQL, so excluded rows never leave the warehouse; a GROUP BY over
the same reason expression says how many were excluded and why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Select, case, exists, false, func, literal, null, select
from sqlalchemy.sql.elements import ColumnElement

from mailflow.triggers.base import Trigger
from mailflow.warehouse.schema import send_ledger, suppressions

#: Ledger states that count as "this customer has heard from this trigger".
_NOTIFIED_STATES = ("planned", "sending", "sent", "unknown")

EXCLUSION_REASONS = (
    "already_notified",
    "recently_notified",
    "suppressed",
    "no_consent",
    "superseded",
)


@dataclass(frozen=True)
class ExtractQueries:
    """The two statements of one extraction."""

    counts: Select[Any]  # (reason, n) for every candidate, reason NULL = eligible
    eligible: Select[Any]  # the eligible rows, in priority order


def build_queries(trigger: Trigger, now: datetime, params: Mapping[str, Any]) -> ExtractQueries:
    """Wrap the trigger's candidate query with the shared exclusion rules."""
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
        (exists().where(send_ledger.c.dedupe_key == r.dedupe_key), "already_notified"),
    ]
    if trigger.cooldown is not None:
        recent = (
            send_ledger.c.trigger == trigger.name,
            send_ledger.c.created_at >= now - trigger.cooldown,
            send_ledger.c.status.in_(_NOTIFIED_STATES),
        )
        # By customer, and by address: two customer records can share one inbox.
        whens.append(
            (
                exists().where(send_ledger.c.customer_id == r.customer_id, *recent),
                "recently_notified",
            )
        )
        whens.append(
            (
                exists().where(send_ledger.c.email == func.lower(func.trim(r.email)), *recent),
                "recently_notified",
            )
        )
    whens.append(
        (exists().where(suppressions.c.email == func.lower(func.trim(r.email))), "suppressed")
    )
    if trigger.kind == "marketing":
        whens.append((r.marketing_consent == false(), "no_consent"))
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


def _chunks(conn: Connection, stmt: Select[Any], size: int) -> Iterator[pd.DataFrame]:
    result = conn.execution_options(stream_results=True, yield_per=size).execute(stmt)
    cols = list(result.keys())
    for part in result.partitions(size):
        yield pd.DataFrame.from_records(part, columns=cols)


def extract(
    conn: Connection,
    trigger: Trigger,
    *,
    now: datetime,
    params: Mapping[str, Any],
    chunk_size: int = 20_000,
) -> Extracted:
    """Run the trigger's query; returns eligible rows plus counts by exclusion reason."""
    queries = build_queries(trigger, now, params)
    excluded: dict[str, int] = {}
    found = 0
    for reason, n in conn.execute(queries.counts):
        found += n
        if reason is not None:
            excluded[reason] = n
    frames = list(_chunks(conn, queries.eligible, chunk_size))
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = pd.DataFrame(columns=[c.name for c in queries.eligible.selected_columns])
    return Extracted(frame=frame, found=found, excluded=excluded)
