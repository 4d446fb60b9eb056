"""A sampling profiler that says which pipeline stage spends the process's CPU.

Every ``interval_s`` a background thread reads each thread's CPU clock
(``pthread_getcpuclockid``) and its Python stack (``sys._current_frames``), and books
the CPU the thread used since the last sample to the stage its stack is in: the
innermost frame that names a stage wins (a SQLAlchemy call inside ``ledger.claim`` is a
ledger write, a Jinja2 call inside ``build_message`` is rendering). Threads waiting on
the network or a lock use no CPU, so they cost nothing here (CPU booked while a thread
is seen waiting goes to what it was last seen doing: short work between two samples);
threads that Prefect,
asyncio or AnyIO start later are picked up at the next sample. The sampler's own CPU
is measured and reported apart.

cProfile would be exact per call but sees one thread only and doubles the cost of
small calls; this sees every thread for about 1 % of one core at 5 ms.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from types import FrameType

#: (path fragment, function name or None for any, stage). First match from the innermost
#: frame outwards decides; order matters only among rules of the same frame.
RULES: tuple[tuple[str, str | None, str], ...] = (
    ("mailflow/mailer/pool.py", "_serve", "event loop (libuv, short callbacks)"),
    ("mailflow/ledger.py", "plan", "ledger writes"),
    ("mailflow/ledger.py", "claim", "ledger writes"),
    ("mailflow/ledger.py", "settle", "ledger writes"),
    ("mailflow/ledger.py", "release", "ledger writes"),
    ("mailflow/ledger.py", "promote_held", "ledger writes"),
    ("mailflow/ledger.py", "withdraw_held", "ledger writes"),
    ("mailflow/ledger.py", "clear_stale_holds", "ledger writes"),
    ("mailflow/ledger.py", "confirm_by_events", "ledger writes"),
    ("mailflow/ledger.py", "planned_ids", "plan"),
    ("mailflow/extract.py", None, "extract"),
    ("mailflow/pipeline/audience.py", "find", "extract"),
    ("mailflow/pipeline/audience.py", "stream", "extract"),
    ("mailflow/validation.py", None, "validate"),
    ("great_expectations/", None, "validate"),
    ("mailflow/pipeline/audience.py", None, "validate"),
    ("mailflow/triggers/", None, "plan"),
    ("mailflow/pipeline/plan.py", None, "plan"),
    ("mailflow/pipeline/reconcile.py", None, "plan"),
    ("mailflow/render.py", None, "render"),
    ("jinja2/", None, "render"),
    ("mailflow/pipeline/message.py", None, "render"),
    ("mailflow/unsubscribe.py", None, "render"),
    ("mailflow/mailer/", None, "HTTP client"),
    ("aiohttp/", None, "HTTP client"),
    ("mailflow/pipeline/send.py", None, "send stage (claim loop, settle queue)"),
    ("mailflow/pipeline/summary.py", None, "record summary"),
    ("mailflow/pipeline/preflight.py", None, "preflight"),
    ("prefect/", None, "Prefect"),
    ("prefect_dask/", None, "Prefect"),
    ("asyncio/", None, "asyncio event loop"),
    ("selectors.py", None, "asyncio event loop"),
    ("anyio/", None, "asyncio event loop"),
    ("concurrent/futures/", None, "thread pools"),
    ("threading.py", None, "thread pools"),
)

#: The order stages are printed in (others follow by CPU).
STAGES = (
    "extract",
    "validate",
    "plan",
    "render",
    "HTTP client",
    "asyncio event loop",
    "event loop (libuv, short callbacks)",
    "ledger writes",
    "send stage (claim loop, settle queue)",
    "record summary",
    "preflight",
    "Prefect",
    "thread pools",
    "other",
)


#: Innermost frames of a thread that waits (select, an idle pool worker, a lock): it uses
#: no CPU there, so CPU booked at such a sample was spent on the work just before it.
IDLE = frozenset(
    {
        "selectors.py:select",
        "futures/thread.py:_worker",
        "python3.11/threading.py:wait",
        "python3.11/queue.py:get",
        # The send loop's thread seen in uvloop's C code (polling, or between callbacks):
        # its CPU since the last sample went mostly to the Python callbacks that ran
        # meanwhile (render, HTTP, settle), so it is booked to the last one seen.
        "mailer/pool.py:_serve",
    }
)


def classify(frame: FrameType | None) -> str:
    """The stage of the innermost frame that names one; ``other`` if none does."""
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        for fragment, func, stage in RULES:
            if fragment in path and (func is None or code.co_name == func):
                return stage
        frame = frame.f_back
    return "other"


def _where(frame: FrameType) -> str:
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").split("/")
    return f"{'/'.join(parts[-2:])}:{code.co_name}"


class StageProfiler:
    """Books every thread's CPU time to pipeline stages, by sampling; a context manager."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.cpu_s: Counter[str] = Counter()
        #: CPU by (stage, innermost frame): where inside a stage the time goes.
        self.detail: Counter[tuple[str, str]] = Counter()
        self.samples = 0
        self.sampler_cpu_s = 0.0
        # By (ident, native id): a thread ident can be reused by a later thread.
        self._clocks: dict[tuple[int, int | None], int] = {}
        self._last: dict[tuple[int, int | None], float] = {}
        self._busy: dict[tuple[int, int | None], tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage-profiler", daemon=True)

    def __enter__(self) -> StageProfiler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _cpu(self, key: tuple[int, int | None]) -> float | None:
        clock = self._clocks.get(key)
        try:
            if clock is None:
                clock = self._clocks[key] = time.pthread_getcpuclockid(key[0])
            return time.clock_gettime(clock)
        except (OSError, OverflowError):
            return None  # the thread ended between the two reads

    def _run(self) -> None:
        me = threading.get_ident()
        started = time.thread_time()
        while not self._stop.wait(self.interval_s):
            self.samples += 1
            threads = {t.ident: t.native_id for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                key = (ident, threads.get(ident))
                now = self._cpu(key)
                if now is None:
                    continue
                used = now - self._last.get(key, now)
                self._last[key] = now
                where = _where(frame)
                if any(where.endswith(idle) for idle in IDLE):
                    # Short work done between two samples (a ledger write in a pool
                    # thread, a burst of callbacks) is over by the time the thread is
                    # seen waiting: book it to what the thread did when last seen busy.
                    stage, where = self._busy.get(key, (classify(frame), where))
                else:
                    stage = classify(frame)
                    self._busy[key] = (stage, where)
                if used > 0:
                    self.cpu_s[stage] += used
                    self.detail[stage, where] += used
            del frame
        self.sampler_cpu_s = time.thread_time() - started

    def hot_spots(self, per_stage: int = 3) -> dict[str, list[tuple[str, float]]]:
        """The innermost functions that used the most CPU, per stage."""
        out: dict[str, list[tuple[str, float]]] = {}
        for (stage, where), used in self.detail.most_common():
            spots = out.setdefault(stage, [])
            if len(spots) < per_stage:
                spots.append((where, used))
        return out

    def report(self) -> dict[str, float]:
        """CPU seconds per stage, in :data:`STAGES` order then the rest."""
        out = {s: self.cpu_s.get(s, 0.0) for s in STAGES}
        out.update({s: v for s, v in self.cpu_s.most_common() if s not in out})
        return out
