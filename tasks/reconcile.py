"""Reconcile stage: resolve ambiguous sends of every trigger from the provider's events.

The webhook does it as events arrive and every sending flow for its own trigger; the
rollup runs it for all triggers before counting, so a missed webhook call is caught and
the analyst tables count what SendGrid accepted.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.pipeline import resources
from mailflow.pipeline.reconcile import resolve


@task(name="reconcile", cache_policy=NONE)
def reconcile_sends(flow_run_id: str | None) -> dict[str, int]:
    """Confirm ambiguous sends by their events; counts by decision (and still unknown)."""
    done = resolve(resources.current(), None, flow_run_id=flow_run_id)
    counts = {**done.counts(), "still unknown": done.unresolved}
    logger = get_run_logger()
    logger.info("reconciled before the rollup: %s", counts)
    if done.note:
        logger.warning(done.note)
    return counts
