"""The webhook service's unsubscribe routes under uvicorn on a real port, with messages
``u1@example.com`` ... planned as ledger ids 1 ... for tokens to name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
from pydantic import SecretStr
from sqlalchemy import Engine

from mailflow import ledger
from mailflow.warehouse.engine import make_engine
from mailflow.webhook.app import EVENTS_PATH
from mailflow.webhook.server import running_webhook
from mailflow.webhook.signing import generate_keypair


@contextlib.contextmanager
def serving_unsubscribes(
    warehouse_url: str, key: SecretStr, messages: int
) -> Iterator[tuple[httpx.Client, Engine]]:
    """A client of the running service (base URL set) and the warehouse engine."""
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(
            conn,
            "abandoned_cart",
            [
                ledger.PlannedMessage(f"abandoned_cart:{i}", f"u{i}@example.com", i, None, {})
                for i in range(1, messages + 1)
            ],
            flow_run_id="r",
        )
    _, public_b64 = generate_keypair()
    try:
        with running_webhook(engine, public_b64, unsubscribe_key=key) as events_url:
            base = events_url.removesuffix(EVENTS_PATH)
            with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
                yield client, engine
    finally:
        engine.dispose()
