"""Plan: a ``planned`` ledger row per message before anything is sent, then batches.

One plan for triggers and campaigns: the trigger's ``build_contexts`` turns rows into
render contexts, its ``variant`` names the ledger variant (a template variant for a
trigger, the experiment arm for a campaign), and the ledger keeps keys unique.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from mailflow import addresses, ledger
from mailflow.clock import utcnow
from mailflow.pipeline import audience
from mailflow.pipeline.audience import Validated
from mailflow.pipeline.reconcile import Reconciled, recheck, resolve
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger

_CHUNK = 5_000


@dataclass
class Plan:
    """Batches of ledger ids to send, and what planning found."""

    batches: list[list[int]]
    offered: int  # rows offered to the ledger this run (known keys are left alone)
    reconciled: Reconciled = field(default_factory=Reconciled)

    @property
    def expired(self) -> int:
        """Rows a stopped run left in ``sending``, now ``unknown``."""
        return self.reconciled.lease_expired

    @property
    def planned(self) -> int:
        """Messages to send in this run (new ones and ones earlier runs left planned)."""
        return sum(len(b) for b in self.batches)


def planned_message(
    trigger: Trigger, row: Mapping[str, Any], context: Mapping[str, Any], params: Mapping[str, Any]
) -> ledger.PlannedMessage:
    """The ledger row for one extracted row and its render context."""
    return ledger.PlannedMessage(
        dedupe_key=str(row["dedupe_key"]),
        # Stored, matched and delivered in one form (mailflow/addresses.py says why).
        email=addresses.normalise(str(row["email"])),
        customer_id=int(row["customer_id"]),
        variant=trigger.variant(row, params),
        context=context,
    )


def offer(
    res: Resources,
    trigger: Trigger,
    chunks: Iterable[pd.DataFrame],
    params: Mapping[str, Any],
    *,
    flow_run_id: str | None,
    status: ledger.Status = ledger.Status.PLANNED,
) -> int:
    """Write a ledger row (``status``) per row of each chunk, one transaction per chunk of
    at most ``_CHUNK`` rows; how many rows were offered (known keys are left alone)."""
    shop = res.shop()
    offered = 0
    for chunk in chunks:
        for start in range(0, len(chunk), _CHUNK):
            part = chunk.iloc[start : start + _CHUNK]
            with res.engine.begin() as conn:
                contexts = trigger.build_contexts(conn, part, shop)
                offered += ledger.plan(
                    conn,
                    trigger.name,
                    (
                        planned_message(trigger, row, ctx, params)
                        for row, ctx in zip(part.to_dict("records"), contexts, strict=True)
                    ),
                    flow_run_id=flow_run_id,
                    status=status,
                )
    return offered


def _batches(
    res: Resources,
    trigger: Trigger,
    params: Mapping[str, Any],
    flow_run_id: str | None,
    batch_size: int,
    offered: int,
    reconciled: Reconciled,
) -> Plan:
    """Re-check what earlier runs left planned, then every planned id in batches."""
    reconciled.stale = recheck(res, trigger, now=utcnow(), params=params, flow_run_id=flow_run_id)
    with res.engine.connect() as conn:
        ids = ledger.planned_ids(conn, trigger.name)
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    return Plan(batches=batches, offered=offered, reconciled=reconciled)


def plan(
    res: Resources,
    trigger: Trigger,
    frame: pd.DataFrame,
    params: Mapping[str, Any],
    *,
    flow_run_id: str | None,
    batch_size: int,
) -> Plan:
    """Write ``planned`` ledger rows for ``frame`` and return the ids to send, in batches.

    First the trigger's ambiguous sends are reconciled (:mod:`mailflow.pipeline.reconcile`).
    The batches also hold rows an earlier run planned but never claimed (it stopped
    before sending them, or reconciliation handed them back): they go once they pass the
    stale re-check, and nothing planned is left behind.
    """
    reconciled = resolve(res, trigger.name, flow_run_id=flow_run_id)
    offered = offer(res, trigger, [frame], params, flow_run_id=flow_run_id)
    return _batches(res, trigger, params, flow_run_id, batch_size, offered, reconciled)


@dataclass
class Prepared:
    """A trigger run's audience and plan: counts, validation totals, and the batches
    (``plan`` is None when the data-quality gate failed: nothing was planned)."""

    found: int
    excluded: dict[str, int]
    validated: Validated
    plan: Plan | None


def prepare(
    res: Resources,
    trigger: Trigger,
    params: Mapping[str, Any],
    now: datetime,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    batch_size: int,
    chunk_size: int = audience.CHUNK_ROWS,
) -> Prepared:
    """Extract → validate → plan, one chunk at a time, so memory does not grow with the
    audience; then the gate over the whole audience, and the batches.

    Each chunk's good rows are written to the ledger as ``held`` as soon as they pass, so
    no chunk stays in memory. When every chunk is in, the gate is judged over all of
    them: it passes → the held rows become ``planned`` in one statement; it fails → they
    are deleted (nothing was sent, nothing can be: held rows are never claimed) and the
    quarantine keeps the evidence. A run that stops midway leaves held rows, which the
    next attempt of the run, or any run after :data:`mailflow.ledger.LEASE`, deletes and
    extracts again.
    """
    reconciled = resolve(res, trigger.name, flow_run_id=flow_run_id)
    with res.engine.begin() as conn:
        ledger.clear_stale_holds(conn, trigger.name, flow_run_id)
    chunked = trigger.suite.streamable
    validation = audience.Validation(
        res, trigger, flow_run_id=flow_run_id, max_bad_share=max_bad_share, chunked=chunked
    )
    with audience.stream(res, trigger, params, now, chunk_size=chunk_size) as streamed:
        chunks: Iterable[pd.DataFrame] = streamed.chunks
        if not chunked:  # a keep="last" rule needs the whole audience at once
            chunks = [pd.concat(list(chunks), ignore_index=True)]
        offered = offer(
            res,
            trigger,
            (validation.chunk(chunk) for chunk in chunks),
            params,
            flow_run_id=flow_run_id,
            status=ledger.Status.HELD,
        )
    validated = validation.result()
    with res.engine.begin() as conn:
        if validated.gate_error is not None:
            ledger.withdraw_held(conn, trigger.name, flow_run_id)
            return Prepared(streamed.found, streamed.excluded, validated, None)
        ledger.promote_held(conn, trigger.name, flow_run_id)
    planned = _batches(res, trigger, params, flow_run_id, batch_size, offered, reconciled)
    return Prepared(streamed.found, streamed.excluded, validated, planned)
