"""Throughput of the local SendGrid API under a realistic load.

The sink runs in its own process (``running_sink(process=True)``) with a fixed
latency; an aiohttp client keeps ``--concurrency`` keep-alive requests in flight
with ~2 KB payloads of one personalization, for at most ``--requests`` requests
or ``--seconds`` seconds per phase, over loopback only.

Two phases run in the same invocation: validation off (the baseline: HTTP and
latency only) and validation on (what the end-to-end benchmark sees). With a
latency L and C requests in flight no server can beat C / L requests a second
(Little's law), so that ceiling is printed too.

    .venv/bin/python bench/sink_throughput.py --latency-ms 50 --concurrency 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import aiohttp
import orjson

from mailflow.sink.testing import running_sink
from mailflow.sink.validation import validate_mail_send


def payload(i: int) -> bytes:
    """A cart-reminder request like the SendGrid mailer builds, about 2 KB."""
    items = "".join(
        f"<tr><td>Item {n} of cart {i}</td><td>{n * 7 % 50 + 9}.99 EUR</td></tr>" for n in range(14)
    )
    html = (
        "<!doctype html><html><body><h1>You left something behind</h1>"
        f"<p>Hello customer {i}, your cart is waiting.</p><table>{items}</table>"
        '<p><a href="https://shop.example.com/cart/c{i}">Back to your cart</a></p>'
        '<p><a href="https://shop.example.com/u/t{i}">Unsubscribe</a></p></body></html>'
    )
    text = f"Hello customer {i}, your cart is waiting: https://shop.example.com/cart/c{i}\n" * 4
    body = {
        "personalizations": [
            {
                "to": [{"email": f"customer{i}@example.com", "name": f"Customer {i}"}],
                "custom_args": {"ledger_id": str(i), "trigger": "abandoned_cart"},
            }
        ],
        "from": {"email": "shop@example.com", "name": "Example Shop"},
        "subject": "You left something in your cart",
        "content": [{"type": "text/plain", "value": text}, {"type": "text/html", "value": html}],
        "categories": ["abandoned_cart"],
        "headers": {
            "List-Unsubscribe": f"<https://shop.example.com/u/t{i}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        "custom_args": {"ledger_id": str(i)},
    }
    return orjson.dumps(body)


@dataclass
class Result:
    accepted: int
    failed: int
    seconds: float
    latencies: list[float]
    sink_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


async def _load(url: str, key: str, *, concurrency: int, requests: int, seconds: float) -> Result:
    bodies = [payload(i) for i in range(512)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    result = Result(0, 0, 0.0, [])
    issued, stop_at, deadline = 0, 0, 0.0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < stop_at and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            began = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                ok = resp.status == 202
            result.latencies.append(time.perf_counter() - began)
            if ok:
                result.accepted += 1
            else:
                result.failed += 1

    async def run(count: int, limit_s: float) -> None:
        nonlocal issued, stop_at, deadline
        issued, stop_at, deadline = 0, count, time.perf_counter() + limit_s
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))

    async with aiohttp.ClientSession(connector=connector) as session:
        await run(concurrency * 3, 5.0)  # warm-up: open the keep-alive connections
        result = Result(0, 0, 0.0, [])
        began, cpu = time.perf_counter(), time.process_time()
        await run(requests, seconds)
        result.seconds = time.perf_counter() - began
        result.client_cpu_s = time.process_time() - cpu
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phase(args: argparse.Namespace, *, validate: bool) -> Result:
    with running_sink(process=True, latency_ms=args.latency_ms, validate=validate) as sink:
        cpu_before = _cpu_seconds(sink.pid)
        result = asyncio.run(
            _load(
                sink.mail_send_url,
                sink.api_key,
                concurrency=args.concurrency,
                requests=args.requests,
                seconds=args.seconds,
            )
        )
        # Includes the warm-up's few hundred requests: a slight overestimate per request.
        result.sink_cpu_s = _cpu_seconds(sink.pid) - cpu_before
    label = "validation on " if validate else "validation off"
    lat = sorted(result.latencies) or [0.0]
    print(
        f"{label}: {result.rate:8.0f} accepted req/s  "
        f"({result.accepted} in {result.seconds:.2f}s, {result.failed} failed)  "
        f"p50 {statistics.median(lat) * 1000:.1f} ms  p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms"
    )
    if result.sink_cpu_s:
        per_request = result.sink_cpu_s / max(result.accepted, 1)
        print(
            f"    sink CPU {per_request * 1e6:.0f} µs per request: one core could serve "
            f"~{1 / per_request:.0f} req/s; client CPU "
            f"{result.client_cpu_s / max(result.accepted, 1) * 1e6:.0f} µs per request"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int, default=60_000, help="per phase, at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase, at most")
    args = parser.parse_args()

    assert validate_mail_send(orjson.loads(payload(1))) == [], "the bench payload must be valid"
    size = len(payload(1))
    ceiling = args.concurrency / (args.latency_ms / 1000.0) if args.latency_ms else float("inf")
    print(
        f"payload {size} bytes, {args.concurrency} concurrent keep-alive clients, "
        f"latency {args.latency_ms:g} ms, ceiling C/L = {ceiling:.0f} req/s"
    )
    baseline = _phase(args, validate=False)
    measured = _phase(args, validate=True)
    print(
        f"validation on / off: {measured.rate / baseline.rate:.2f}x   "
        f"share of the C/L ceiling: {measured.rate / ceiling:.2f}"
    )


if __name__ == "__main__":
    main()
