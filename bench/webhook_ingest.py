"""Webhook ingest: signed batches of SendGrid events into the embedded warehouse.

Starts ``mailflow webhook`` (uvicorn, its own process) on a fresh SQLite file, then
posts ``--batches`` signed batches of ``--batch-size`` events over loopback, a few at
a time, and measures events/s. Baseline in the same run: the same events written
straight into the same kind of table with one ``executemany`` per batch (no HTTP, no
verification, no dedupe work), i.e. the floor set by SQLite itself. Afterwards it
re-posts every batch (SendGrid delivers at least once) and checks that the table
holds exactly one row per distinct event: 0 lost, 0 duplicated.

    .venv/bin/python bench/webhook_ingest.py --batches 100 --batch-size 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailflow.health import wait_healthy  # noqa: E402
from mailflow.webhook.signing import (  # noqa: E402
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    generate_keypair,
    sign,
)

KINDS = ("processed", "delivered", "open", "click", "bounce", "unsubscribe", "deferred")


def make_batch(b: int, size: int, now: int) -> list[dict[str, object]]:
    out = []
    for i in range(size):
        n = b * size + i
        kind = KINDS[n % len(KINDS)]
        event: dict[str, object] = {
            "email": f"user{n % 50_000}@example.com",
            "event": kind,
            "timestamp": now - n % 3600,
            "sg_event_id": f"ev-{n}",
            "sg_message_id": f"msg-{n // 3}.filter",
            "ledger_id": str(n // 3),
            "trigger": "abandoned_cart",
            "category": ["abandoned_cart"],
        }
        if kind == "click":
            event["url"] = f"https://shop.example.com/cart/{n}"
        if kind == "bounce":
            event["type"] = "bounce" if n % 2 else "blocked"
            event["reason"] = "550 5.1.1 unknown user"
        out.append(event)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def post_all(base: str, bodies: list[bytes], key: object, parallel: int) -> list[int]:
    sem = asyncio.Semaphore(parallel)
    stored: list[int] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(body: bytes) -> None:
            async with sem:
                ts = str(int(time.time()))
                headers = {SIGNATURE_HEADER: sign(key, ts, body), TIMESTAMP_HEADER: ts}  # type: ignore[arg-type]
                r = await client.post(
                    f"{base}/webhooks/sendgrid/events", content=body, headers=headers
                )
                r.raise_for_status()
                stored.append(r.json()["stored"])

        await asyncio.gather(*(one(b) for b in bodies))
    return stored


def baseline(url: str, batches: list[list[dict[str, object]]]) -> float:
    """Plain executemany of the raw events into a table of the same shape."""
    from sqlalchemy import JSON, Column, Integer, MetaData, String, Table

    from mailflow.warehouse.engine import make_engine

    md = MetaData()
    plain = Table(
        "plain_events",
        md,
        Column("id", Integer, primary_key=True),
        Column("sg_event_id", String(128)),
        Column("event", String(32)),
        Column("email", String(320)),
        Column("raw", JSON),
    )
    engine = make_engine(url)
    md.create_all(engine)
    start = time.perf_counter()
    for batch in batches:
        with engine.begin() as conn:
            conn.execute(
                plain.insert(),
                [
                    {
                        "sg_event_id": e["sg_event_id"],
                        "event": e["event"],
                        "email": e["email"],
                        "raw": e,
                    }
                    for e in batch
                ],
            )
    took = time.perf_counter() - start
    engine.dispose()
    return sum(len(b) for b in batches) / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mailflow-webhook-bench-"))
    url = f"sqlite:///{workdir / 'warehouse.db'}"
    now = int(time.time())
    batches = [make_batch(b, args.batch_size, now) for b in range(args.batches)]
    bodies = [orjson.dumps(b) for b in batches]
    total = sum(len(b) for b in batches)

    base_rate = baseline(f"sqlite:///{workdir / 'baseline.db'}", batches)
    print(f"baseline plain executemany into SQLite: {base_rate:,.0f} events/s")

    key, public_b64 = generate_keypair()
    port = free_port()
    env = {**os.environ, "MAILFLOW_WEBHOOK_PUBLIC_KEY": public_b64}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailflow.cli", "webhook", "--port", str(port), "--warehouse", url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, trust_env=False) as client:
            wait_healthy(
                client, what="mailflow webhook", alive=lambda: proc.poll() is None, timeout=60
            )
        start = time.perf_counter()
        stored = asyncio.run(post_all(base, bodies, key, args.parallel))
        took = time.perf_counter() - start
        again = asyncio.run(post_all(base, bodies, key, args.parallel))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    from sqlalchemy import func, select

    from mailflow.warehouse.engine import make_engine
    from mailflow.warehouse.schema import events

    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(events)).scalar_one()
        distinct = conn.execute(
            select(func.count(func.distinct(events.c.sg_event_id)))
        ).scalar_one()
    engine.dispose()
    rate = total / took
    print(
        f"mailflow webhook (signed, verified, deduplicated, HTTP): {rate:,.0f} events/s "
        f"({total:,} events in {args.batches} batches of {args.batch_size}, {took:.1f}s)"
    )
    print(f"ratio webhook / plain executemany: {rate / base_rate:.2f}")
    print(
        f"stored {sum(stored):,} of {total:,}; re-delivered all: stored {sum(again):,} more; "
        f"table rows {rows:,}, distinct events {distinct:,}; "
        f"lost {total - rows:,}, duplicated {rows - distinct:,}"
    )


if __name__ == "__main__":
    main()
