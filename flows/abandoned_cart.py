"""Flow ``abandoned-cart``: remind customers of carts they left behind."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.pipeline import run_trigger
from mailflow.pipeline.options import BATCH_SIZE, MAX_BAD_SHARE, BatchSize, MaxBadShare
from mailflow.pipeline.summary import RunSummary
from mailflow.runners import configured_task_runner


@flow(
    name="abandoned-cart",
    description="Email customers whose cart has been idle for a while and never ordered.",
    # Threads of this process by default (a few batches in flight, each waiting mostly
    # on the network), or a Dask cluster: MAILFLOW_TASK_RUNNER, read at run start.
    task_runner=configured_task_runner(),
)
def abandoned_cart(
    idle_hours: Annotated[float, Field(gt=0, le=168)] = 4.0,
    max_age_days: Annotated[float, Field(gt=0, le=30)] = 7.0,
    vip_threshold: Annotated[float, Field(ge=0)] = 1000.0,
    batch_size: BatchSize = BATCH_SIZE,
    max_bad_share: MaxBadShare = MAX_BAD_SHARE,
    override_guardrail: bool = False,
) -> RunSummary:
    """Find abandoned carts, validate, plan in the ledger, render, send, record.

    Args:
        idle_hours: A cart idle longer than this (hours) is abandoned.
        max_age_days: Carts idle longer than this (days) are left alone.
        vip_threshold: Lifetime value from which the VIP variant is sent.
        batch_size: Messages per send task (one Prefect task, retried as a unit).
        max_bad_share: Fail the run when more than this share of new rows is bad.
        override_guardrail: Send even though recent bounce or complaint rates are too high.
    """
    return run_trigger(
        "abandoned_cart",
        {"idle_hours": idle_hours, "max_age_days": max_age_days, "vip_threshold": vip_threshold},
        batch_size=batch_size,
        max_bad_share=max_bad_share,
        override_guardrail=override_guardrail,
    )


def demo_run() -> RunSummary:
    """For the demo: remind the seeded shop's abandoned carts (a second call sends nothing)."""
    return abandoned_cart()
