"""One event loop and one pooled HTTP session per process, shared by every send batch.

A send batch is a Prefect task; run as an ``async`` task, Prefect gives each one a new
event loop (``asyncio.run``), so each batch had to open its own connection pool and
throw it away a second later: at 1,000 messages a batch and 100 connections each, a
tenth of all requests paid for a new TCP (and, against SendGrid, TLS) connection, and
every batch paid for a new loop and its thread pool. Here the batches of one process
(the flow's threads, or one Dask worker) hand their coroutine to one long-lived loop
(uvloop when installed) and share one mailer per configuration, whose keep-alive
connections outlive the batch.

    report = shared_loop().run(
        lambda mailer: send_batch(res, ..., mailer=mailer),
        lambda: res.mailer(shared=True),
        key=res.mailer_key(),
    )
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

from mailflow.mailer.base import Mailer

__all__ = ["SendLoop", "shared_loop"]

T = TypeVar("T")

#: Mailers kept open at once (one per configuration; tests switch local APIs often).
_KEEP = 4


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works too
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    # A frame of our own under the loop's C code, so a profiler can name the thread.
    loop.run_forever()


class SendLoop:
    """A daemon thread running one event loop, and the mailers that live on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mailers: OrderedDict[Hashable, Mailer] = OrderedDict()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = _new_loop()
                threading.Thread(
                    target=_serve, args=(loop,), name="mailflow-send-loop", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _mailer(self, key: Hashable, make: Callable[[], Mailer]) -> Mailer:
        with self._lock:
            mailer = self._mailers.get(key)
            if mailer is None:
                mailer = self._mailers[key] = make()
                if len(self._mailers) > _KEEP:
                    _, old = self._mailers.popitem(last=False)
                    assert self._loop is not None
                    asyncio.run_coroutine_threadsafe(old.aclose(), self._loop)
            self._mailers.move_to_end(key)
            return mailer

    def run(
        self,
        work: Callable[[Mailer], Awaitable[T]],
        make_mailer: Callable[[], Mailer],
        *,
        key: Hashable,
    ) -> T:
        """Run ``work(mailer)`` on the shared loop and wait for its result (or error).

        ``key`` identifies the mailer's configuration: a batch with the same key reuses
        the mailer (and its open connections), another key gets its own.
        """
        loop = self._running_loop()
        mailer = self._mailer(key, make_mailer)

        async def call() -> T:
            return await work(mailer)

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def close(self) -> None:
        """Close every mailer's connections and stop the loop (at interpreter exit)."""
        with self._lock:
            loop, self._loop = self._loop, None
            mailers = list(self._mailers.values())
            self._mailers.clear()
        if loop is None or loop.is_closed():
            return

        async def close_all() -> None:
            await asyncio.gather(*(m.aclose() for m in mailers), return_exceptions=True)

        with contextlib.suppress(Exception):  # best effort, at exit
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)


_shared = SendLoop()
atexit.register(_shared.close)


def shared_loop() -> SendLoop:
    """This process's send loop."""
    return _shared
