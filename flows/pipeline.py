"""The one pipeline every trigger runs: preflight → extract → validate → plan → send → record.

Extract, validate and plan are one task that streams the audience chunk by chunk into the
ledger; the send tasks get ledger ids, never rows.

Called from inside a trigger's flow; it orders tasks and holds no business logic (that
is in ``mailflow/pipeline``).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from mailflow.clock import utcnow
from mailflow.errors import DataQualityError, FatalRunError, MailflowError, TransientError
from mailflow.pipeline.send import forget_abort
from mailflow.pipeline.summary import RunSummary
from mailflow.settings import get_settings
from mailflow.triggers import get_trigger
from tasks.plan import prepare_messages
from tasks.preflight import check_before_sending
from tasks.record import record_summary
from tasks.send import send_batch


def send_planned(
    trigger_name: str, batches: list[list[int]], run_id: str | None
) -> MailflowError | None:
    """Submit one send task per batch of ledger ids; the run's error, if any.

    Shared by every sending flow (triggers and campaigns).
    """
    settings = get_settings()
    sender = send_batch.with_options(
        retries=settings.send_task_retries,
        retry_delay_seconds=settings.send_task_retry_delays_s,
    )
    error: MailflowError | None = None
    futures = [sender.submit(trigger_name, ids, n, run_id) for n, ids in enumerate(batches, 1)]
    for future in futures:
        future.wait()
        state = future.state
        if not state.is_failed():
            continue
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, MailflowError):
            exc = MailflowError(f"a send batch failed unexpectedly: {exc!r}")
        # A refused key outranks everything; otherwise the first error is reported.
        if error is None or isinstance(exc, FatalRunError):
            error = exc
    forget_abort(run_id)
    return error


def finish(summary: RunSummary, started: Any, error: MailflowError | None) -> RunSummary:
    """Record the summary; then raise the run's error (or a pending one), if any."""
    if error is not None:
        summary.error = str(error)
    summary = record_summary(summary, started)
    if summary.error is not None:
        get_run_logger().error("%s run did not finish cleanly: %s", summary.trigger, summary.error)
        raise error or TransientError(summary.error)
    return summary


def run_trigger(
    trigger_name: str,
    params: dict[str, Any],
    *,
    batch_size: int,
    max_bad_share: float,
    override_guardrail: bool = False,
) -> RunSummary:
    """Run ``trigger_name`` once and return its summary.

    Raises (after the summary is published): ``FatalRunError`` when the key was refused,
    ``DataQualityError`` when the validation gate failed, ``TransientError`` when some
    messages are still pending after every retry (the next run sends them).
    """
    started = utcnow()
    run_id = flow_run.get_id()
    params = get_trigger(trigger_name).params(params)
    # Fail fast, before anything is planned.
    check_before_sending(trigger_name, started, override_guardrail)

    summary = RunSummary(trigger=trigger_name, flow_run_id=run_id)
    prepared = prepare_messages(trigger_name, params, started, run_id, max_bad_share, batch_size)
    summary.audience(prepared.found, prepared.excluded, prepared.validated)
    error: MailflowError | None = None
    if prepared.plan is None:
        error = DataQualityError(str(prepared.validated.gate_error))
    else:
        summary.take_plan(prepared.plan)
        error = send_planned(trigger_name, prepared.plan.batches, run_id)
    return finish(summary, started, error)
