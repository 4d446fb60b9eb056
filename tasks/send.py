"""Send stage: one Prefect task per batch — claim, render, send, record.

A batch (hundreds to a thousand messages) is the unit of a task, so Prefect's
per-task cost is paid per batch, not per email. Inside a batch the requests run
concurrently over pooled connections.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.states import State
from pydantic import SecretStr
from sqlalchemy import Connection, select

from mailflow import ledger
from mailflow.campaigns.trigger import resolve_trigger
from mailflow.campaigns.window import schedule
from mailflow.clock import utcnow
from mailflow.errors import FatalRunError, TemplateError, TransientError
from mailflow.mailer.base import OutboundMessage, Outcome, SendResult
from mailflow.mailer.sendgrid import FatalSendError, SendGridMailer
from mailflow.render import Renderer
from mailflow.settings import get_settings
from mailflow.triggers import Trigger
from mailflow.unsubscribe import list_unsubscribe_headers, unsubscribe_url
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import send_ledger

#: The reason on rows a run hands back when it stops on a refused key. It is also the
#: run's stop mark for batches in other processes: they find it in the ledger.
STOPPED_REASON = "not sent: run stopped"

#: The reason on rows handed back because the recipient's send window opens beyond
#: SendGrid's 72 h ``send_at`` limit: a later run sends them.
DEFERRED_REASON = "deferred: outside the recipient's send window; a later run sends it"

# Flow runs that hit a fatal error: their remaining batches must not start. Batches
# running in this process (the thread runner) learn it here at no cost; batches sent
# to other processes (the Dask runner) also look for the stop mark in the ledger.
_aborted_runs: set[str] = set()
_aborted_lock = threading.Lock()


def _abort(flow_run_id: str | None) -> None:
    with _aborted_lock:
        _aborted_runs.add(flow_run_id or "")


def forget_abort(flow_run_id: str | None) -> None:
    """Drop the run's abort mark once the run is over (in the flow's process)."""
    with _aborted_lock:
        _aborted_runs.discard(flow_run_id or "")


def _away_from_flow_process() -> bool:
    """True when this task runs in another process than its flow (e.g. a Dask worker)."""
    ctx = FlowRunContext.get()
    # Prefect marks a flow run context that was serialised and rebuilt elsewhere.
    return ctx is not None and ctx.detached


def _stopped_in_ledger(conn: Connection, flow_run_id: str) -> bool:
    """Did a batch of this run, in any process, hand rows back because the run stopped?"""
    cols = send_ledger.c
    return (
        conn.execute(
            select(cols.id)
            .where(
                cols.flow_run_id == flow_run_id,
                cols.status == "planned",
                cols.reason.startswith(STOPPED_REASON, autoescape=True),
            )
            .limit(1)
        ).first()
        is not None
    )


def is_aborted(flow_run_id: str | None) -> bool:
    """Has this flow run stopped (a refused key)? Its remaining batches must not send."""
    with _aborted_lock:
        if (flow_run_id or "") in _aborted_runs:
            return True
    # In the flow's process the mark above is complete. Elsewhere, ask the ledger: one
    # indexed query per batch, paid only when batches run away from their flow.
    if flow_run_id is None or not _away_from_flow_process():
        return False
    with get_engine().connect() as conn:
        stopped = _stopped_in_ledger(conn, flow_run_id)
    if stopped:
        _abort(flow_run_id)
    return stopped


@lru_cache(maxsize=4)
def _renderer(templates_dir: str) -> Renderer:
    return Renderer(Path(templates_dir))


def get_renderer() -> Renderer:
    """The process-wide renderer (compiled templates are cached inside)."""
    return _renderer(str(get_settings().templates_dir))


def retry_only_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry the batch only for errors worth retrying (never for a refused key)."""
    # _sync: this runs inside the async task engine, where result() would be a coroutine.
    exc = state.result(raise_on_failure=False, _sync=True)  # type: ignore[call-overload]
    return isinstance(exc, TransientError)


@dataclass
class BatchReport:
    """What one batch did (this attempt)."""

    claimed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def build_message(
    claimed: ledger.ClaimedMessage,
    trigger: Trigger,
    renderer: Renderer,
    *,
    unsubscribe: tuple[str, SecretStr] | None,
    send_at: int | None = None,
) -> OutboundMessage:
    """Render one claimed ledger row into a message (raises ``TemplateError``).

    ``unsubscribe`` is ``(base_url, signing key)`` for marketing messages: they carry
    RFC 8058 one-click headers and the same link in the footer. The link needs the
    ledger id, so it is added here rather than stored with the planned context.
    ``send_at`` (unix time) schedules delivery, e.g. at the opening of quiet hours.

    A context may name the template variant to render (``template_variant``); else the
    ledger's variant is used. Campaigns need both: their ledger variant is the experiment
    arm, their template variant follows the segment.
    """
    ctx = claimed.context
    headers: dict[str, str] = {}
    if unsubscribe is not None:
        url = unsubscribe_url(unsubscribe[0], unsubscribe[1], claimed.id)
        ctx = {**ctx, "links": {**ctx.get("links", {}), "unsubscribe": url}}
        headers = list_unsubscribe_headers(url)
    rendered = renderer.render(
        trigger.template,
        ctx,
        locale=ctx.get("customer", {}).get("locale"),
        variant=ctx.get("template_variant", claimed.variant),
    )
    customer = ctx.get("customer", {})
    return OutboundMessage(
        ledger_id=claimed.id,
        to_email=claimed.email,
        to_name=customer.get("first_name") or None,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        categories=(trigger.name,),
        # Comes back on every engagement event: links the event to this ledger row.
        custom_args={"ledger_id": str(claimed.id), "trigger": trigger.name},
        headers=headers,
        send_at=send_at,
    )


def unsubscribe_settings(trigger: Trigger) -> tuple[str, SecretStr] | None:
    """Where one-click unsubscribes go and the key that signs them (marketing only)."""
    if trigger.kind != "marketing":
        return None
    s = get_settings()
    return s.unsubscribe_base_url, s.unsubscribe_key()


def make_mailer() -> SendGridMailer:
    """The configured SendGrid mailer (local API in demo mode)."""
    s = get_settings()
    return SendGridMailer(
        s.sendgrid_host,
        s.api_key(),
        from_email=s.from_email,
        from_name=s.from_name,
        concurrency=s.http_concurrency,
        timeout_s=s.http_timeout_s,
        max_attempts=s.http_max_attempts,
        backoff_base_s=s.http_backoff_base_s,
    )


@task(
    name="send-batch",
    task_run_name="send-{trigger_name}-{batch_no}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_only_transient,
    cache_policy=NONE,
    persist_result=False,
)
async def send_batch(
    trigger_name: str, ledger_ids: list[int], batch_no: int, flow_run_id: str | None
) -> BatchReport:
    """Claim the batch's planned rows, render, send, and record every answer.

    Raises:
        TransientError: some messages were not accepted yet (429/5xx); they are back
            to ``planned`` and the task retry sends them (never the others).
        FatalRunError: the key was refused; nothing unsent is marked sent.
    """
    logger = get_run_logger()
    if is_aborted(flow_run_id):
        return BatchReport()
    trigger = resolve_trigger(trigger_name)  # a registered trigger or a stored campaign
    # A configuration error stops here, before anything is claimed.
    mailer = make_mailer()
    unsub = unsubscribe_settings(trigger)
    engine = get_engine()
    with engine.begin() as conn:
        claimed = ledger.claim(conn, ledger_ids, flow_run_id=flow_run_id)
    if not claimed:
        return BatchReport()

    renderer = get_renderer()
    results: list[SendResult] = []
    messages: list[OutboundMessage] = []
    # Quiet hours (a ``send_window`` in the context): outside it a message is scheduled for
    # the next opening with ``send_at``, or — beyond SendGrid's 72 h — handed back to
    # ``planned`` for a later run. Never dropped.
    now = utcnow()
    deferred: list[int] = []
    for c in claimed:
        when = schedule(c.context.get("send_window"), now)
        if when.later:
            deferred.append(c.id)
            continue
        try:
            messages.append(
                build_message(c, trigger, renderer, unsubscribe=unsub, send_at=when.send_at_unix)
            )
        except TemplateError as exc:
            results.append(SendResult(c.id, Outcome.FAILED, reason=f"template: {exc}", attempts=0))

    try:
        async with mailer:
            results.extend(await mailer.send_many(messages))
    except FatalSendError as exc:
        _abort(flow_run_id)
        results.extend(exc.settled)
        settled_ids = {r.ledger_id for r in results}
        with engine.begin() as conn:
            ledger.settle(conn, results)
            ledger.release(
                conn,
                [m.ledger_id for m in messages if m.ledger_id not in settled_ids] + deferred,
                reason=f"{STOPPED_REASON} ({exc})",
            )
        raise FatalRunError(str(exc)) from None

    with engine.begin() as conn:
        ledger.settle(conn, results)
        ledger.release(conn, deferred, reason=DEFERRED_REASON)
    outcomes = Counter(r.outcome.value for r in results)
    if deferred:
        outcomes["deferred"] = len(deferred)
    report = BatchReport(claimed=len(claimed), outcomes=dict(outcomes))
    logger.info(
        "batch %d: %s", batch_no, ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items()))
    )
    pending = [r for r in results if r.outcome is Outcome.RETRY]
    if pending:
        raise TransientError(
            f"{len(pending)} of {len(claimed)} messages not accepted yet "
            f"({pending[0].reason}); they are back to planned and will be retried"
        )
    return report
