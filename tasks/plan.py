"""Plan stage: a ledger row per message before anything is sent, then batches of ids."""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.pipeline import plan, resources
from mailflow.pipeline.plan import Plan
from mailflow.triggers import get_trigger


@task(name="plan", cache_policy=NONE, persist_result=False)
def plan_messages(
    trigger_name: str,
    frame: pd.DataFrame,
    params: dict[str, Any],
    flow_run_id: str | None,
    batch_size: int,
) -> Plan:
    """Write ``planned`` ledger rows for ``frame``; the ids to send, in batches."""
    result = plan.plan(
        resources.current(),
        get_trigger(trigger_name),
        frame,
        params,
        flow_run_id=flow_run_id,
        batch_size=batch_size,
    )
    log_plan(trigger_name, result, batch_size)
    return result


def log_plan(trigger_name: str, result: Plan, batch_size: int) -> None:
    """What planning did, in the run's log."""
    logger = get_run_logger()
    reconciled = result.reconciled
    if reconciled.counts():
        logger.warning("%s: before sending, %s", trigger_name, reconciled.counts())
    if reconciled.note:
        logger.warning(
            "%s: %d sends still unknown. %s", trigger_name, reconciled.unresolved, reconciled.note
        )
    logger.info(
        "%s: %d messages planned in %d batches of up to %d",
        trigger_name,
        result.planned,
        len(result.batches),
        batch_size,
    )
