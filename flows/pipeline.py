"""The one pipeline every trigger runs: extract → validate → plan → render/send → record.

Called from inside a trigger's flow; it orders tasks and holds no business logic.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from mailflow.clock import utcnow
from mailflow.errors import DataQualityError, FatalRunError, MailflowError, TransientError
from mailflow.settings import get_settings
from mailflow.triggers import get_trigger
from tasks.extract import extract_recipients
from tasks.guardrail import check_deliverability
from tasks.plan import plan_messages
from tasks.record import RunSummary, record_summary
from tasks.send import forget_abort, get_renderer, send_batch, unsubscribe_settings
from tasks.validate import validate_recipients


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
    logger = get_run_logger()
    started = utcnow()
    run_id = flow_run.get_id()
    trigger = get_trigger(trigger_name)
    params = trigger.params(params)
    # Fail fast, before anything is planned: a missing key or a broken template
    # would otherwise turn every message of the run into a failure.
    get_settings().api_key()
    unsubscribe_settings(trigger)
    if override_guardrail:
        logger.warning("deliverability guardrail overridden for this run")
    else:
        check_deliverability(started)
    get_renderer().check(trigger.template)

    summary = RunSummary(trigger=trigger_name, flow_run_id=run_id)
    extracted = extract_recipients(trigger_name, params, started)
    summary.found, summary.excluded = extracted.found, extracted.excluded
    validated = validate_recipients(trigger_name, extracted.frame, run_id, max_bad_share)
    summary.quarantined, summary.quarantined_rows = validated.quarantined, validated.bad_rows
    summary.still_quarantined = validated.still_quarantined
    error: MailflowError | None = None
    if validated.gate_error:
        error = DataQualityError(validated.gate_error)
    else:
        batches = plan_messages(trigger_name, validated.frame, params, run_id, batch_size)
        summary.planned = sum(len(b) for b in batches)
        error = send_planned(trigger_name, batches, run_id)
    if error is not None:
        summary.error = str(error)
    summary = record_summary(summary, started)
    if summary.error is not None:
        logger.error("%s run did not finish cleanly: %s", trigger_name, summary.error)
        raise error or TransientError(summary.error)
    return summary
