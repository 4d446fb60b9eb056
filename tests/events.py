"""The local SendGrid API posting signed events to the real webhook, for tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from mailflow.sink.testing import SinkHandle, running_sink
from mailflow.warehouse.engine import make_engine
from mailflow.webhook.server import running_webhook
from mailflow.webhook.signing import generate_keypair, private_key_pem


@contextlib.contextmanager
def hooked_sink(warehouse_url: str, **overrides: Any) -> Iterator[SinkHandle]:
    """A local SendGrid API whose events go, signed, to the webhook app writing into
    ``warehouse_url`` (``overrides``: sink and event settings, e.g. ``events_seed=3``)."""
    engine = make_engine(warehouse_url)
    key, public_b64 = generate_keypair()
    try:
        with (
            running_webhook(engine, public_b64) as events_url,
            running_sink(
                webhook_url=events_url, webhook_private_key=private_key_pem(key), **overrides
            ) as handle,
        ):
            yield handle
    finally:
        engine.dispose()


def wait_for_events(sink: SinkHandle, *, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the sink has posted every event it generated; returns its event counters."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev: dict[str, Any] = sink.stats().get("events", {})
        # Done when every generated event was posted (the webhook answered: stored and
        # committed) or given up; "pending" alone misses the batch being posted.
        settled = ev.get("posted", 0) + ev.get("failed", 0) + ev.get("discarded", 0)
        if ev.get("generated", 0) and settled >= ev["generated"]:
            return ev
        time.sleep(0.05)
    raise AssertionError(f"events still pending after {timeout:g} s: {sink.stats()}")
