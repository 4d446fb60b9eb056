"""End-to-end throughput of the abandoned-cart flow, beside a plain sendgrid-python loop.

Seeds N abandoned carts (the BENCH shop profile) into a fresh SQLite warehouse, starts
the local SendGrid API in its own process with a fixed latency, then measures in the
same run:

- baseline: ``sendgrid.SendGridAPIClient`` sending messages one after another (the way
  most scripts use it) to the same local API;
- mailflow: the ``abandoned-cart`` flow, extract → validate → plan → render → send →
  ledger, timed from the flow's own start to its end (the ``mf_runs`` row);
- a second run right after, which must send nothing.

Prints messages/s of both, their ratio and the peak RSS of this process (the flow
runs in it). Loopback only; every loop is bounded.

    ./dev bench --carts 100000 --latency-ms 50
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def baseline(url: str, api_key: str, count: int) -> float:
    """Messages/s of a plain loop over the official client."""
    from sendgrid import SendGridAPIClient

    from mailflow.mailer.base import OutboundMessage
    from mailflow.mailer.sendgrid import build_payload

    client = SendGridAPIClient(api_key=api_key, host=url)
    start = time.perf_counter()
    for i in range(count):
        msg = OutboundMessage(
            ledger_id=i,
            to_email=f"baseline{i}@example.com",
            subject="You left something behind",
            html="<p>Your cart is waiting.</p>" * 40,
            text="Your cart is waiting.\n" * 40,
            categories=("abandoned_cart",),
            custom_args={"ledger_id": str(i)},
        )
        response = client.client.mail.send.post(
            request_body=build_payload(msg, from_email="shop@example.com", from_name="Shop")
        )
        assert response.status_code == 202, response.status_code
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carts", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--baseline-messages", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
    url = f"sqlite:///{workdir / 'warehouse.db'}"
    os.environ["MAILFLOW_WAREHOUSE_URL"] = url
    os.environ["MAILFLOW_DEMO"] = "true"

    from sqlalchemy import func, select

    from mailflow.demo.seed import BENCH_PROFILE, seed_shop
    from mailflow.settings import get_settings
    from mailflow.sink.testing import running_sink
    from mailflow.warehouse.engine import get_engine, make_engine
    from mailflow.warehouse.migrate import upgrade
    from mailflow.warehouse.schema import run_log, send_ledger

    upgrade(url)
    engine = make_engine(url)
    stats = seed_shop(engine, customers=args.carts, seed=7, profile=BENCH_PROFILE)
    engine.dispose()
    print(f"seeded {stats.abandoned_candidates:,} abandoned carts in {stats.seconds:.1f}s")

    # keep=1000: the sink holds only the newest messages; counting is all we need here.
    with running_sink(process=True, latency_ms=args.latency_ms, keep=1000) as sink:
        os.environ["MAILFLOW_SENDGRID_HOST"] = sink.url
        get_settings.cache_clear()
        base = baseline(sink.url, sink.api_key, args.baseline_messages)
        print(f"baseline sendgrid-python loop: {base:,.1f} msg/s ({args.baseline_messages} msgs)")
        sink.clear()

        from flows.abandoned_cart import abandoned_cart

        wall = time.perf_counter()
        first = abandoned_cart(batch_size=args.batch_size)
        wall = time.perf_counter() - wall
        second = abandoned_cart(batch_size=args.batch_size)
        accepted = sink.stats()["accepted"]

    with get_engine().connect() as conn:
        started, finished = conn.execute(
            select(run_log.c.started_at, run_log.c.finished_at).order_by(run_log.c.id).limit(1)
        ).one()
        states = dict(
            conn.execute(
                select(send_ledger.c.status, func.count()).group_by(send_ledger.c.status)
            ).all()
        )
        keys = conn.execute(select(func.count(func.distinct(send_ledger.c.dedupe_key)))).scalar()
    flow_s = (finished - started).total_seconds()
    rate = first.sent / flow_s
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"mailflow abandoned-cart flow: {first.sent:,} sent in {flow_s:.1f}s "
        f"= {rate:,.0f} msg/s (wall incl. Prefect start {wall:.1f}s)"
    )
    print(f"ratio mailflow / baseline: {rate / base:,.1f}x")
    print(f"peak RSS of the flow process: {rss_mb:,.0f} MB")
    print(f"second run sent: {second.sent}; local API accepted in all: {accepted:,}")
    print(f"ledger states: {states}; rows {sum(states.values()):,}, distinct keys {keys:,}")


if __name__ == "__main__":
    main()
