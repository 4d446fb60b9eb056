"""Flow ``order-status``: tell customers their order shipped or was delivered (transactional)."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.pipeline import run_trigger
from mailflow.pipeline.options import BATCH_SIZE, MAX_BAD_SHARE, BatchSize, MaxBadShare
from mailflow.pipeline.summary import RunSummary
from mailflow.runners import configured_task_runner


@flow(
    name="order-status",
    description="Email customers when an order is shipped or delivered, once per order and status.",
    task_runner=configured_task_runner(),
)
def order_status(
    max_age_hours: Annotated[float, Field(gt=0, le=720)] = 72.0,
    batch_size: BatchSize = BATCH_SIZE,
    max_bad_share: MaxBadShare = MAX_BAD_SHARE,
    override_guardrail: bool = False,
) -> RunSummary:
    """Find recent shipped/delivered status changes, validate, plan, render, send, record.

    Args:
        max_age_hours: Status changes older than this (hours) are not announced any more.
        batch_size: Messages per send task (one Prefect task, retried as a unit).
        max_bad_share: Fail the run when more than this share of new rows is bad.
        override_guardrail: Send even though recent bounce or complaint rates are too high.
    """
    return run_trigger(
        "order_status",
        {"max_age_hours": max_age_hours},
        batch_size=batch_size,
        max_bad_share=max_bad_share,
        override_guardrail=override_guardrail,
    )


def demo_run() -> RunSummary:
    """For the demo: announce the seeded shop's shipments and deliveries of the last 3 days."""
    return order_status()
