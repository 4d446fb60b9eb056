"""A running local SendGrid API for tests and benchmarks: ``running_sink()``.

    with running_sink(latency_ms=5) as sink:
        ...send to sink.url with sink.api_key...
        assert sink.stats()["accepted"] == 1

The server listens on a free 127.0.0.1 port. The listening socket is opened
here and handed to the server (thread) or inherited by it (child process), so
there is no window in which another program could take the port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mailflow.health import wait_healthy
from mailflow.sink.app import SinkState
from mailflow.sink.config import SinkConfig
from mailflow.sink.server import build_server

__all__ = ["SinkHandle", "running_sink"]

_STOP_TIMEOUT_S = 15.0


@dataclass
class SinkHandle:
    """A running sink: where it is, its key, and helpers that talk to it over HTTP."""

    url: str
    api_key: str
    config: SinkConfig
    client: httpx.Client = field(repr=False)
    #: The live state, only when the sink runs in this process (thread mode).
    state: SinkState | None = field(default=None, repr=False)
    #: The id of the process serving it (this one in thread mode).
    pid: int = field(default_factory=os.getpid)

    @property
    def mail_send_url(self) -> str:
        """The full URL of ``POST /v3/mail/send``."""
        return f"{self.url}/v3/mail/send"

    def messages(
        self,
        *,
        to: str | None = None,
        category: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Accepted messages, oldest first (``GET /_sink/messages``)."""
        params: dict[str, str | int] = {"limit": limit, "offset": offset}
        if to is not None:
            params["to"] = to
        if category is not None:
            params["category"] = category
        return self._get("/_sink/messages", params=params)

    def message(self, message_id: str) -> dict[str, Any] | None:
        """One accepted message by ``X-Message-Id``; None if unknown."""
        response = self.client.get(f"/_sink/messages/{message_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """Counters: accepted, rejected by status, dropped, in flight, uptime (and
        ``events`` when a webhook_url is set)."""
        return self._get("/_sink/stats")

    def tally(self, *, values: bool = False) -> dict[str, Any]:
        """Accepted messages per ``count_arg`` value (``GET /_sink/tally``); with
        ``values``, every value seen under ``seen``."""
        return self._get("/_sink/tally", params={"values": 1} if values else None)

    @property
    def webhook_public_key(self) -> str:
        """The base64 verification key of the events the sink signs (needs webhook_url).

        Raises:
            httpx.HTTPStatusError: the sink has no webhook_url (400).
        """
        return str(self._get("/_sink/webhook-key")["public_key"])

    def faults(self) -> dict[str, Any]:
        """The fault settings in force (``script`` shows what is left of it)."""
        return self._get("/_sink/faults")

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change some fault settings (``latency_ms=50``, ``script=[...]``, ...).

        Raises:
            httpx.HTTPStatusError: the sink refused a setting (400, message names it).
        """
        response = self.client.post("/_sink/faults", json=changes)
        response.raise_for_status()
        return response.json()

    def reset_faults(self) -> dict[str, Any]:
        """Back to the fault settings the sink started with."""
        response = self.client.delete("/_sink/faults")
        response.raise_for_status()
        return response.json()

    def clear(self) -> int:
        """Forget the stored messages (and the tally); returns how many were held."""
        response = self.client.delete("/_sink/messages")
        response.raise_for_status()
        return int(response.json()["cleared"])

    def seed_suppressions(self, **lists: list[Any]) -> dict[str, int]:
        """Put entries on suppression lists (``bounces=["a@x.io", {"email": ...,
        "created": 1700000000}]``); returns how many were new per list."""
        response = self.client.post("/_sink/suppressions", json=lists)
        response.raise_for_status()
        return dict(response.json()["added"])

    def suppression_counts(self) -> dict[str, int]:
        """Entries per suppression list (``GET /_sink/suppressions``)."""
        return dict(self._get("/_sink/suppressions"))

    def _get(self, path: str, params: dict[str, str | int] | None = None) -> Any:
        response = self.client.get(path, params=params)
        response.raise_for_status()
        return response.json()


def _listening_socket() -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they
    # are TCP, and without it every response written in two parts waits ~40 ms for an ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


_WHAT = "the local SendGrid API"


@contextlib.contextmanager
def running_sink(
    *, process: bool = False, startup_timeout: float = 20.0, **config_overrides: Any
) -> Iterator[SinkHandle]:
    """Run a local SendGrid API on a free loopback port for the ``with`` block.

    Args:
        process: run it in a child process (benchmarks: it gets its own core) instead
            of a background thread of this process (tests: starts in milliseconds).
        startup_timeout: seconds to wait for ``/healthz``.
        **config_overrides: ``SinkConfig.build`` keywords, sink and fault settings alike
            (``latency_ms=50``, ``rate_limit=10``, ``forbidden_keys=("SG.ro",)``, ...).

    Yields:
        A ``SinkHandle``; ``api_key`` is the first accepted key.

    Raises:
        ConfigError: a bad override. RuntimeError: the server did not come up.
    """
    config = SinkConfig.build(**config_overrides)
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = httpx.Client(base_url=url, trust_env=False, timeout=30.0)
    with client, contextlib.closing(sock):
        if process:
            with _child_process(config, sock, client, startup_timeout) as pid:
                yield SinkHandle(url, config.api_keys[0], config, client, pid=pid)
        else:
            with _thread(config, sock, client, startup_timeout) as state:
                yield SinkHandle(url, config.api_keys[0], config, client, state)


@contextlib.contextmanager
def _thread(
    config: SinkConfig, sock: socket.socket, client: httpx.Client, timeout: float
) -> Iterator[SinkState]:
    server = build_server(config, configure_logging=False)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="mailflow-sink", daemon=True
    )
    thread.start()
    try:
        wait_healthy(client, what=_WHAT, alive=thread.is_alive, timeout=timeout)
        yield server.sink
    finally:
        client.close()  # idle keep-alive connections would only slow the shutdown down
        server.should_exit = True
        thread.join(_STOP_TIMEOUT_S)


@contextlib.contextmanager
def _child_process(
    config: SinkConfig, sock: socket.socket, client: httpx.Client, timeout: float
) -> Iterator[int]:
    env = dict(os.environ)
    # The child must import this very package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-c",
        "from mailflow.sink.server import _main; _main()",
        "--fd",
        str(sock.fileno()),
        "--config",
        json.dumps(config.to_dict()),
    ]
    child = subprocess.Popen(command, pass_fds=[sock.fileno()], env=env)
    sock.close()  # the child holds its own copy
    try:
        wait_healthy(client, what=_WHAT, alive=lambda: child.poll() is None, timeout=timeout)
        yield child.pid
    finally:
        client.close()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        try:
            child.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
