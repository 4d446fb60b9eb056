"""Plan stage: extract → validate → a ledger row per message, chunk by chunk; then batches."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.pipeline import plan, resources
from mailflow.pipeline.plan import Plan, Prepared
from mailflow.triggers import get_trigger


@task(name="extract-validate-plan", cache_policy=NONE, persist_result=False)
def prepare_messages(
    trigger_name: str,
    params: dict[str, Any],
    now: datetime,
    flow_run_id: str | None,
    max_bad_share: float,
    batch_size: int,
) -> Prepared:
    """Stream the trigger's audience through validation into the ledger (see ``plan.prepare``).

    Returns the counts and the batches of ledger ids: the rows themselves stay in the
    warehouse, so the task's memory does not grow with the audience.
    """
    result = plan.prepare(
        resources.current(),
        get_trigger(trigger_name),
        params,
        now,
        flow_run_id=flow_run_id,
        max_bad_share=max_bad_share,
        batch_size=batch_size,
    )
    log_audience(trigger_name, result)
    if result.plan is not None:
        log_plan(trigger_name, result.plan, batch_size)
    return result


def log_audience(trigger_name: str, result: Prepared) -> None:
    """What extraction and validation found, in the run's log."""
    logger = get_run_logger()
    excluded = sum(result.excluded.values())
    logger.info(
        "%s: found %d candidates, %d eligible; excluded: %s",
        trigger_name,
        result.found,
        result.found - excluded,
        ", ".join(f"{k}={v}" for k, v in sorted(result.excluded.items())) or "none",
    )
    validated = result.validated
    if validated.all_bad:
        logger.warning(
            "%s: quarantined %d new rows (%s); %d quarantined earlier are still bad "
            "— see table mf_quarantine",
            trigger_name,
            validated.bad_rows,
            ", ".join(f"{k}={n}" for k, n in sorted(validated.quarantined.items())) or "none",
            validated.still_quarantined,
        )


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
