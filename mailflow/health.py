"""Waiting for a local service (the SendGrid stand-in, the webhook) to answer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import httpx


def wait_healthy(
    client: httpx.Client,
    *,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    timeout: float = 20.0,
    path: str = "/healthz",
) -> None:
    """Poll ``path`` on ``client``'s base URL until it answers 200.

    Raises:
        RuntimeError: the service exited (``alive`` is false) or did not answer in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if client.get(path).status_code == 200:
                return
        if not alive():
            raise RuntimeError(f"{what} exited during start-up (see stderr)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {path} in {timeout}s")
        time.sleep(0.02)
