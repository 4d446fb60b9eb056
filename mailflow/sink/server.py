"""Run the local SendGrid API under uvicorn.

``serve`` is what ``mailflow sink`` calls; ``build_server`` is the piece
``mailflow.sink.testing`` reuses to run it in a thread or a child process. The
server uses httptools and uvloop when they are installed (several times faster
than h11 and asyncio's loop) and falls back to uvicorn's pure-Python parts.

The HTTP protocol is uvicorn's own, extended only to record each connection's
transport in ``SinkState.connections``: that is what lets a "drop" fault close a
socket without an answer (see ``mailflow.sink.app``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn

from mailflow.sink.app import SinkState, create_app, sink_state
from mailflow.sink.config import SinkConfig

if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
else:  # pragma: no cover - depends on what is installed
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol  # type: ignore[assignment]

__all__ = ["SinkServer", "build_server", "serve"]

_LOOP = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


class _TrackingProtocol(_UvicornProtocol):
    """uvicorn's HTTP protocol, plus the transport registry the drop fault needs."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._sink: SinkState | None = getattr(
            getattr(self.config.app, "state", None), "sink", None
        )
        if self._sink is not None and self.client is not None:
            self._sink.connections[self.client] = transport
            self._sink.tracks_connections = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sink is not None and self.client is not None:
            self._sink.connections.pop(self.client, None)
        super().connection_lost(exc)


class SinkServer(uvicorn.Server):
    """A uvicorn server that cuts pending latencies short when it shuts down, so a
    "slow" fault does not hold the shutdown for its whole delay, and then flushes
    pending webhook events (bounded)."""

    def __init__(self, config: uvicorn.Config, state: SinkState) -> None:
        super().__init__(config)
        self.sink = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.sink.interrupt_pauses()
        await super().shutdown(sockets)
        await self.sink.aclose()  # after the last request, so its events are queued


def build_server(
    config: SinkConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 3030,
    configure_logging: bool = True,
) -> SinkServer:
    """A ready-to-run server for ``config`` (call ``.run()``, or ``.run(sockets=[sock])``).

    ``configure_logging=False`` leaves the process's logging alone (for embedding in
    tests or other programs); uvicorn then only sets its loggers to WARNING.
    """
    app = create_app(config)
    options: dict[str, Any] = {}
    if not configure_logging:
        options["log_config"] = None
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_TrackingProtocol,
        loop=_LOOP,
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # the drop fault finds connections by their real peer address
        timeout_keep_alive=30,  # pooled clients may idle between batches
        timeout_graceful_shutdown=5,
        **options,
    )
    return SinkServer(uv_config, sink_state(app))


def serve(config: SinkConfig, host: str = "127.0.0.1", port: int = 3030) -> None:
    """Serve the local SendGrid API on ``host:port`` until interrupted (Ctrl+C, SIGTERM)."""
    build_server(config, host=host, port=port).run()


def _main(argv: Sequence[str] | None = None) -> None:
    """Child-process entry of ``running_sink(process=True)``: serve on an inherited socket."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="listening socket to serve on")
    parser.add_argument("--config", default="{}", help="SinkConfig.to_dict() as JSON")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    config = SinkConfig.build(**json.loads(args.config))
    build_server(config).run(sockets=[sock])


if __name__ == "__main__":
    _main()
