"""Send one batch: claim its planned rows, render, send through the mailer, settle.

A batch (hundreds to a thousand messages) is the unit of a Prefect task, so Prefect's
per-task cost is paid per batch, not per email. Inside a batch the mailer runs the
requests concurrently over pooled connections. Rows are claimed ``settle_every`` at a
time as the mailer is ready for them, and answers are written in groups of the same
size as they come back: a crash leaves only the requests in flight (plus at most a
group either side) ambiguous, not the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from pydantic import SecretStr
from sqlalchemy import Engine

from mailflow import ledger
from mailflow.campaigns.window import schedule
from mailflow.clock import utcnow
from mailflow.errors import FatalRunError, TemplateError, TransientError
from mailflow.mailer.base import Mailer, OutboundMessage, Outcome, SendResult
from mailflow.pipeline.message import build_message
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger

STOPPED_REASON = ledger.STOPPED_REASON
DEFERRED_REASON = ledger.DEFERRED_REASON
#: Bounce events received this recently make a batch check the run's error budget.
_BOUNCE_LOOKBACK = timedelta(minutes=1)

# Flow runs that hit a fatal error: their remaining batches must not start. Batches
# running in this process (the thread runner) learn it here at no cost; batches in
# other processes (the Dask runner) look for the run's stop mark in the ledger.
_aborted_runs: set[str] = set()
_aborted_lock = threading.Lock()


def _abort(flow_run_id: str | None) -> None:
    with _aborted_lock:
        _aborted_runs.add(flow_run_id or "")


def forget_abort(flow_run_id: str | None) -> None:
    """Drop the run's abort mark once the run is over (in the flow's process)."""
    with _aborted_lock:
        _aborted_runs.discard(flow_run_id or "")


def is_aborted(res: Resources, flow_run_id: str | None, *, away_from_flow: bool) -> bool:
    """Has this flow run stopped (a refused key)? Its remaining batches must not send.

    ``away_from_flow``: the batch runs in another process than its flow (a Dask worker),
    where the in-process mark is not complete and the ledger's stop mark is asked.
    """
    with _aborted_lock:
        if (flow_run_id or "") in _aborted_runs:
            return True
    if flow_run_id is None or not away_from_flow:
        return False
    with res.engine.connect() as conn:
        stopped = ledger.is_stopped(conn, flow_run_id)
    if stopped:
        _abort(flow_run_id)
    return stopped


class _Settler:
    """Writes the provider's answers to the ledger in small groups while the batch is
    still sending, so a crash leaves only the requests in flight ambiguous."""

    def __init__(self, engine: Engine, every: int) -> None:
        self._engine = engine
        self._every = every
        self._pending: list[SendResult] = []
        self._writes: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()  # one writer per batch; groups in any order

    def add(self, result: SendResult) -> None:
        """Take one answer (called in the event loop); write a group once it is full."""
        self._pending.append(result)
        if len(self._pending) >= self._every:
            self._write_soon()

    def _write_soon(self) -> None:
        group, self._pending = self._pending, []
        self._writes.append(asyncio.ensure_future(asyncio.to_thread(self._write, group)))

    def _write(self, group: list[SendResult]) -> None:
        unknown = [r.ledger_id for r in group if r.outcome is Outcome.UNKNOWN]
        with self._lock:
            with self._engine.begin() as conn:
                ledger.settle(conn, group)
            if unknown:
                # After the commit, in a transaction of its own: an event the webhook
                # committed meanwhile is seen here, or the webhook sees ``unknown``.
                with self._engine.begin() as conn:
                    ledger.confirm_by_events(conn, ledger_ids=unknown)

    async def drain(self) -> None:
        """Write what is left and wait for every group (a failed write raises)."""
        if self._pending:
            self._write_soon()
        writes, self._writes = self._writes, []
        await asyncio.gather(*writes)


@dataclass
class BatchReport:
    """What one batch did (this attempt)."""

    claimed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def _check_error_budget(
    res: Resources, trigger: Trigger, flow_run_id: str | None, *, failed_here: bool
) -> None:
    """Stop the run once too many of its answers were permanent failures or bounces
    (``MAILFLOW_RUN_MAX_FAILURE_SHARE``), the way listmonk pauses a campaign past
    ``MaxSendErrors``: the run's other batches see the stop mark, the rest stays planned.

    Raises:
        FatalRunError: the budget is spent; the message says how and what to do.
    """
    if flow_run_id is None:
        return
    s = res.settings
    with res.engine.connect() as conn:
        # The run-wide count is only worth it after a refusal here or recent bounces
        # (cheap, indexed checks), not after every clean batch of a long run.
        if not failed_here and not ledger.bounced_since(conn, utcnow() - _BOUNCE_LOOKBACK):
            return
        e = ledger.run_errors(conn, trigger.name, flow_run_id)
    if e.answered < s.run_failure_min or e.bad <= s.run_max_failure_share * e.answered:
        return
    reason = (
        f"error budget spent: {e.bad} of {e.answered} answered messages were refused for "
        f"good ({e.failed}) or bounced ({e.bounced}), more than "
        f"MAILFLOW_RUN_MAX_FAILURE_SHARE={s.run_max_failure_share:g}; the run stopped "
        "sending and the rest stays planned. Check the reasons in mf_send_ledger (status "
        "failed) and the bounce events, fix the data or the template, then run again"
    )
    _abort(flow_run_id)
    with res.engine.begin() as conn:
        ledger.mark_stopped(conn, flow_run_id, reason)
    raise FatalRunError(reason)


class _Feed:
    """The batch's messages, claimed a few rows at a time as the mailer asks for them,
    so rows wait in ``sending`` only while their request is (about to be) in flight.

    The next group is claimed while the current one is rendered and sent: the mailer's
    workers would otherwise stand still for a warehouse round trip between groups (and,
    with several batches and their answers to write, wait for the warehouse's write
    lock or the GIL). So at most one group more is in ``sending`` ahead of its requests;
    :meth:`aclose` takes that group back when the batch stops early.
    """

    def __init__(
        self,
        res: Resources,
        trigger: Trigger,
        ledger_ids: Sequence[int],
        *,
        flow_run_id: str | None,
        unsubscribe: tuple[str, SecretStr] | None,
    ) -> None:
        self._res, self._trigger, self._ids = res, trigger, list(ledger_ids)
        self._run, self._unsub = flow_run_id, unsubscribe
        self.claimed: list[int] = []
        self.unrendered: list[SendResult] = []
        # Quiet hours (a ``send_window`` in the context): outside it a message is scheduled
        # for the next opening with ``send_at``, or — beyond SendGrid's 72 h — handed back
        # to ``planned`` for a later run. Never dropped.
        self.deferred: list[int] = []
        # Claimed but never handed to the mailer (the batch stopped early): back to planned.
        self.unsent: list[int] = []
        self.handed: set[int] = set()  # ids of the messages handed to the mailer
        self._ahead: asyncio.Future[list[ledger.ClaimedMessage]] | None = None

    def _claim(self, ids: list[int]) -> list[ledger.ClaimedMessage]:
        with self._res.engine.begin() as conn:
            return ledger.claim(conn, ids, flow_run_id=self._run)

    def _claim_soon(self, ids: list[int]) -> asyncio.Future[list[ledger.ClaimedMessage]]:
        return asyncio.ensure_future(asyncio.to_thread(self._claim, ids))

    async def _take_ahead(self) -> list[ledger.ClaimedMessage]:
        """The group claimed ahead (waited for), now counted as claimed."""
        ahead, self._ahead = self._ahead, None
        claimed = await ahead if ahead is not None else []
        self.claimed += [c.id for c in claimed]
        return claimed

    async def aclose(self) -> None:
        """Wait for a claim still under way; rows it took and nobody sent go to ``unsent``."""
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                self.unsent += [c.id for c in await self._take_ahead()]

    async def messages(self) -> AsyncIterator[OutboundMessage]:
        step = self._res.settings.settle_every
        groups = [self._ids[s : s + step] for s in range(0, len(self._ids), step)]
        for n, group in enumerate(groups):
            if (self._run or "") in _aborted_runs:
                await self.aclose()
                return  # another batch of this run hit a refused key
            if self._ahead is None:
                self._ahead = self._claim_soon(group)
            claimed = await self._take_ahead()
            if n + 1 < len(groups):
                self._ahead = self._claim_soon(groups[n + 1])
            now = utcnow()
            # The group is rendered in one go, then handed over. Rendered one at a time,
            # between the HTTP client's callbacks, a message cost two to three times the
            # CPU (236-325 against 120 µs, the send thread's own CPU time in the bench),
            # most likely because the CPU's caches held the client's code and data each
            # time rather than the templates'.
            ready: list[OutboundMessage] = []
            for c in claimed:
                when = schedule(c.context.get("send_window"), now)
                if when.later:
                    self.deferred.append(c.id)
                    continue
                try:
                    ready.append(
                        build_message(
                            c,
                            self._trigger,
                            self._res.renderer,
                            unsubscribe=self._unsub,
                            send_at=when.send_at_unix,
                        )
                    )
                except TemplateError as exc:
                    self.unrendered.append(
                        SendResult(c.id, Outcome.FAILED, reason=f"template: {exc}", attempts=0)
                    )
            for msg in ready:
                self.handed.add(msg.ledger_id)
                yield msg

    def never_handed(self) -> list[int]:
        """Rows claimed (or claimed ahead) whose message never reached the mailer and
        that nothing else settles: safe to send again."""
        done = self.handed | set(self.deferred) | {r.ledger_id for r in self.unrendered}
        return [i for i in self.claimed if i not in done] + self.unsent


async def send_batch(
    res: Resources,
    trigger: Trigger,
    ledger_ids: Sequence[int],
    *,
    flow_run_id: str | None,
    away_from_flow: bool = False,
    mailer: Mailer | None = None,
) -> BatchReport:
    """Claim the batch's planned rows (a few at a time, as requests can go), render,
    send, and record every answer as it comes.

    ``mailer``: a mailer shared with other batches (its connections stay open after this
    one, see :mod:`mailflow.mailer.pool`); None: a new one, closed at the end.

    Raises:
        TransientError: some messages were not accepted yet (429/5xx); they are back
            to ``planned`` and a retry sends them (never the others).
        FatalRunError: the key was refused; nothing unsent is marked sent, the run's
            stop mark is set.
    """
    if is_aborted(res, flow_run_id, away_from_flow=away_from_flow):
        return BatchReport()
    # A configuration error stops here, before anything is claimed.
    own = mailer is None
    mailer = res.mailer() if mailer is None else mailer
    feed = _Feed(
        res, trigger, ledger_ids, flow_run_id=flow_run_id, unsubscribe=res.unsubscribe(trigger)
    )
    settler = _Settler(res.engine, res.settings.settle_every)
    try:
        try:
            sent = await mailer.send_many(feed.messages(), on_result=settler.add)
        finally:
            await feed.aclose()
            if own:
                await mailer.aclose()
    except FatalRunError as exc:
        _abort(flow_run_id)
        await settler.drain()
        done = {r.ledger_id for r in [*feed.unrendered, *exc.settled]}
        with res.engine.begin() as conn:
            ledger.settle(conn, feed.unrendered)
            ledger.release(
                conn,
                [i for i in feed.claimed if i not in done],
                reason=f"{STOPPED_REASON} ({exc})",
            )
            ledger.mark_stopped(conn, flow_run_id, str(exc))
        raise FatalRunError(str(exc)) from None
    except BaseException:
        # Anything else (the warehouse went away, the network, a cancelled task): write
        # the answers already in, and give back the rows whose message never reached the
        # mailer, if the warehouse still lets us. A message handed to the mailer without
        # an answer stays in ``sending`` (it may have gone out): the lease and
        # reconciliation settle it, as after a crash.
        with contextlib.suppress(Exception):
            await settler.drain()
        with contextlib.suppress(Exception), res.engine.begin() as conn:
            ledger.settle(conn, feed.unrendered)
            ledger.release(conn, feed.deferred, reason=DEFERRED_REASON)
            ledger.release(conn, feed.never_handed(), reason=STOPPED_REASON)
        raise

    await settler.drain()
    if not feed.claimed:
        return BatchReport()
    results = [*feed.unrendered, *sent]
    with res.engine.begin() as conn:
        ledger.settle(conn, feed.unrendered)
        ledger.release(conn, feed.deferred, reason=DEFERRED_REASON)
        ledger.release(conn, feed.unsent, reason=STOPPED_REASON)
    _check_error_budget(
        res, trigger, flow_run_id, failed_here=any(r.outcome is Outcome.FAILED for r in results)
    )
    outcomes = Counter(r.outcome.value for r in results)
    if feed.deferred:
        outcomes["deferred"] = len(feed.deferred)
    pending = [r for r in results if r.outcome is Outcome.RETRY]
    if pending:
        raise TransientError(
            f"{len(pending)} of {len(feed.claimed)} messages not accepted yet "
            f"({pending[0].reason}); they are back to planned and will be retried"
        )
    return BatchReport(claimed=len(feed.claimed), outcomes=dict(outcomes))
