"""Plan: a ``planned`` ledger row per message before anything is sent, then batches.

One plan for triggers and campaigns: the trigger's ``build_contexts`` turns rows into
render contexts, its ``variant`` names the ledger variant (a template variant for a
trigger, the experiment arm for a campaign), and the ledger keeps keys unique.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mailflow import addresses, ledger
from mailflow.clock import utcnow
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
    engine = res.engine
    shop = res.shop()
    reconciled = resolve(res, trigger.name, flow_run_id=flow_run_id)
    offered = 0
    for start in range(0, len(frame), _CHUNK):
        part = frame.iloc[start : start + _CHUNK]
        with engine.begin() as conn:
            contexts = trigger.build_contexts(conn, part, shop)
            offered += ledger.plan(
                conn,
                trigger.name,
                (
                    planned_message(trigger, row, ctx, params)
                    for row, ctx in zip(part.to_dict("records"), contexts, strict=True)
                ),
                flow_run_id=flow_run_id,
            )
    reconciled.stale = recheck(res, trigger, now=utcnow(), params=params, flow_run_id=flow_run_id)
    with engine.connect() as conn:
        ids = ledger.planned_ids(conn, trigger.name)
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    return Plan(batches=batches, offered=offered, reconciled=reconciled)
