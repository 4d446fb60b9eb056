"""Serve the webhook app in a background thread (the demo and tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine

from mailflow.health import wait_healthy
from mailflow.webhook import signing
from mailflow.webhook.app import EVENTS_PATH, create_app


@contextlib.contextmanager
def running_webhook(
    engine: Engine,
    public_key_b64: str,
    *,
    unsubscribe_key: SecretStr | None = None,
    tolerance_s: int = signing.DEFAULT_TOLERANCE_S,
    startup_timeout: float = 10.0,
) -> Iterator[str]:
    """The real webhook app under uvicorn on a free loopback port; yields the events URL."""
    app = create_app(
        engine=engine,
        public_key_b64=public_key_b64,
        verify=True,
        tolerance_s=tolerance_s,
        unsubscribe_key=unsubscribe_key,
    )
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets it knows are TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=base, trust_env=False) as client:
            wait_healthy(
                client, what="the webhook service", alive=thread.is_alive, timeout=startup_timeout
            )
        yield base + EVENTS_PATH
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
