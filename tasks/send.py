"""Send stage: one Prefect task per batch — claim, render, send, record.

The work is :func:`mailflow.pipeline.send.send_batch`; this task adds Prefect's retries,
only for errors worth retrying.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.states import State

from mailflow.campaigns.trigger import resolve_trigger
from mailflow.errors import TransientError
from mailflow.mailer.pool import shared_loop
from mailflow.pipeline import resources
from mailflow.pipeline import send as send_stage
from mailflow.pipeline.send import BatchReport


def retry_only_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry the batch only for errors worth retrying (never for a refused key)."""
    # _sync: result() must not hand back a coroutine, whichever task engine calls this.
    exc = state.result(raise_on_failure=False, _sync=True)  # type: ignore[call-overload]
    return isinstance(exc, TransientError)


def _away_from_flow_process() -> bool:
    """True when this task runs in another process than its flow (e.g. a Dask worker)."""
    ctx = FlowRunContext.get()
    # Prefect marks a flow run context that was serialised and rebuilt elsewhere.
    return ctx is not None and ctx.detached


@task(
    name="send-batch",
    task_run_name="send-{trigger_name}-{batch_no}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_only_transient,
    cache_policy=NONE,
    persist_result=False,
)
def send_batch(
    trigger_name: str, ledger_ids: list[int], batch_no: int, flow_run_id: str | None
) -> BatchReport:
    """Claim the batch's planned rows, render, send, and record every answer.

    A sync task on purpose: the work runs on the process's shared send loop, whose
    mailer keeps its connections open from one batch to the next (an async task gets a
    new event loop, hence a new connection pool, per batch).
    """
    res = resources.current()
    trigger = resolve_trigger(trigger_name)  # a registered trigger or a stored campaign
    away = _away_from_flow_process()
    report = shared_loop().run(
        lambda mailer: send_stage.send_batch(
            res, trigger, ledger_ids, flow_run_id=flow_run_id, away_from_flow=away, mailer=mailer
        ),
        lambda: res.mailer(shared=True),
        key=res.mailer_key(),
    )
    if report.claimed:
        get_run_logger().info(
            "batch %d: %s",
            batch_no,
            ", ".join(f"{k}={v}" for k, v in sorted(report.outcomes.items())),
        )
    return report
