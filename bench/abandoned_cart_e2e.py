"""End-to-end throughput of the abandoned-cart flow, beside the bare-client ceiling.

Seeds N abandoned carts (the BENCH shop profile) into a fresh warehouse (SQLite, or a
throwaway PostgreSQL server like the tests start), starts the local SendGrid API in its
own process with a fixed latency, then measures in the same run:

- mailflow: the ``abandoned-cart`` flow in a process of its own (under Prefect's test
  harness, a temporary Prefect server), extract → validate → plan → render → send →
  ledger, timed from the flow's own start to its end (the ``mf_runs`` row), with that
  process's CPU (user + system) per message, its peak RSS and a stage breakdown of its
  CPU from a sampling profiler (``bench/stageprof.py``); then a second run, which must
  send nothing;
- the ceiling: a bare asyncio client (aiohttp on uvloop, one session, as many requests in flight
  as mailflow has: ``MAILFLOW_HTTP_CONCURRENCY`` × ``MAILFLOW_TASK_THREADS``) posting
  payloads of the size mailflow sent to the same local API;
- the strawman: ``sendgrid.SendGridAPIClient`` in a loop, on a small sample.

Afterwards it checks that the ledger holds one row per dedupe key and that the local API
accepted exactly one message per ledger id marked sent (the API counts them by the
``ledger_id`` custom arg, whether it still stores the message or not). Loopback only;
every loop is bounded. Machine load (``uptime``) is printed beside the figures: on a
shared machine compare ratios measured in the same run, not figures across runs.

    ./dev bench --recipients 100000 --latency-ms 50 [--warehouse postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load() -> str:
    """The load averages (1, 5, 15 min), as ``uptime`` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_s(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


# --- the strawman and the ceiling ---------------------------------------------------------


def sendgrid_loop(url: str, api_key: str, count: int) -> float:
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
            custom_args={"ledger_id": f"baseline-{i}"},
        )
        response = client.client.mail.send.post(
            request_body=build_payload(msg, from_email="shop@example.com", from_name="Shop")
        )
        assert response.status_code == 202, response.status_code
    return count / (time.perf_counter() - start)


async def _bare_client(
    url: str, api_key: str, payload: dict[str, Any], count: int, concurrency: int
) -> None:
    import aiohttp
    import orjson

    person = payload["personalizations"][0]
    todo = iter(range(count))
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for i in todo:
                # What a hand-written loop does per message: its own recipient and id,
                # the body serialised once.
                one = {
                    **person,
                    "to": [{**person["to"][0], "email": f"ceiling{i}@example.com"}],
                    "custom_args": {**person.get("custom_args", {}), "ledger_id": f"c{i}"},
                }
                body = orjson.dumps({**payload, "personalizations": [one]})
                async with session.post(f"{url}/v3/mail/send", data=body) as resp:
                    await resp.read()
                    assert resp.status == 202, resp.status

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def median_payload(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """The payload of median size among ``payloads`` (the ceiling posts that one)."""
    import orjson

    return sorted(payloads, key=lambda p: len(orjson.dumps(p)))[len(payloads) // 2]


def bare_client(
    url: str, api_key: str, payload: dict[str, Any], count: int, concurrency: int
) -> tuple[float, float]:
    """Messages/s and CPU seconds of a bare aiohttp client with ``concurrency`` in flight."""
    import uvloop

    cpu0, start = cpu_s(resource.getrusage(resource.RUSAGE_SELF)), time.perf_counter()
    # On uvloop, like mailflow's send loop: the ceiling is the best a bare loop does.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_bare_client(url, api_key, payload, count, concurrency))
    wall = time.perf_counter() - start
    return count / wall, cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - cpu0


# --- the flow, in a process of its own ------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program.

    Linux's ``ru_maxrss`` keeps the peak of the forked copy of the parent from before
    ``exec`` (here: the benchmark's main process, which has just built the whole shop),
    so it reports the parent's size; ``VmHWM`` is this program's own high-water mark.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flow_process(out: Path, batch_size: int, interval_s: float) -> None:
    """Run the flow twice under Prefect's test harness; write the figures to ``out``."""
    import psutil
    from prefect.testing.utilities import prefect_test_harness
    from sqlalchemy import select

    from bench.stageprof import StageProfiler

    me = psutil.Process()
    seen: dict[int, float] = {}  # CPU seconds of each child process when last polled

    def poll_children() -> None:
        # Polled while the flow runs: Dask's workers are gone by the time it ends.
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                seen[child.pid] = t.user + t.system

    def others_cpu() -> float:  # the Prefect server the harness started, Dask's workers
        poll_children()
        return sum(seen.values())

    stop = threading.Event()

    def poller() -> None:
        while not stop.wait(0.5):
            poll_children()

    with prefect_test_harness(server_startup_timeout=120):
        from flows.abandoned_cart import abandoned_cart
        from mailflow.warehouse.engine import get_engine
        from mailflow.warehouse.schema import run_log

        server0 = others_cpu()
        usage0, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        polling = threading.Thread(target=poller, daemon=True)
        polling.start()
        with StageProfiler(interval_s) as profiler:
            first = abandoned_cart(batch_size=batch_size)
        stop.set()
        polling.join()
        wall = time.perf_counter() - wall
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu = others_cpu() - server0
        first_peak_mb = peak_rss_mb()  # the run that sends everything
        second = abandoned_cart(batch_size=batch_size)
        with get_engine().connect() as conn:
            started, finished = conn.execute(
                select(run_log.c.started_at, run_log.c.finished_at).order_by(run_log.c.id).limit(1)
            ).one()
    figures = {
        "found": first.found,
        "planned": first.planned,
        "sent": first.sent,
        "unknown": first.unknown,
        "failed": first.failed_total,
        "flow_s": (finished - started).total_seconds(),
        "wall_s": wall,
        "user_s": usage1.ru_utime - usage0.ru_utime,
        "sys_s": usage1.ru_stime - usage0.ru_stime,
        "peak_rss_mb": first_peak_mb,
        "peak_rss_both_mb": peak_rss_mb(),
        "stages": profiler.report(),
        "hot_spots": profiler.hot_spots(),
        "profiler_cpu_s": profiler.sampler_cpu_s,
        "other_cpu_s": server_cpu,
        "second_sent": second.sent,
    }
    out.write_text(json.dumps(figures))


def run_flow_process(
    args: argparse.Namespace, env: dict[str, str], workdir: Path
) -> dict[str, Any]:
    out = workdir / "flow.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--flow-process",
        str(out),
        "--batch-size",
        str(args.batch_size),
        "--sample-ms",
        str(args.sample_ms),
    ]
    subprocess.run(command, env={**os.environ, **env}, check=True, cwd=ROOT)
    return dict(json.loads(out.read_text()))


# --- the warehouse ------------------------------------------------------------------------


@contextlib.contextmanager
def warehouse(kind: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated warehouse URL: a SQLite file, or a database on a throwaway
    PostgreSQL server (``tests/pgserver.py``, or ``MAILFLOW_TEST_POSTGRES_URL``)."""
    from mailflow.warehouse.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'warehouse.db'}"
        upgrade(url)
        yield url
        return
    from tests.pgserver import DatabaseFactory, postgres_admin_url

    with postgres_admin_url() as admin:
        factory = DatabaseFactory(admin, upgrade)
        try:
            yield factory.create()
        finally:
            factory.close()


def check_ledger(url: str, accepted: dict[str, Any]) -> list[str]:
    """One ledger row per key; one accepted message per ledger id marked sent."""
    from sqlalchemy import func, select

    from mailflow.warehouse.engine import make_engine
    from mailflow.warehouse.schema import send_ledger

    cols = send_ledger.c
    engine = make_engine(url)
    with engine.connect() as conn:
        rows, keys = conn.execute(
            select(func.count(), func.count(func.distinct(cols.dedupe_key)))
        ).one()
        states = dict(conn.execute(select(cols.status, func.count()).group_by(cols.status)).all())
        sent = {
            str(i) for i in conn.execute(select(cols.id).where(cols.status == "sent")).scalars()
        }
    engine.dispose()
    seen = set(accepted["seen"])
    problems = []
    if rows != keys:
        problems.append(f"{rows - keys} dedupe keys have more than one ledger row")
    if accepted["repeated"]:
        problems.append(f"{len(accepted['repeated'])} ledger ids were accepted more than once")
    if seen - sent:
        problems.append(f"{len(seen - sent)} accepted messages have no ledger row marked sent")
    if sent - seen:
        problems.append(f"{len(sent - seen)} ledger rows marked sent never reached the API")
    print(
        f"ledger: {rows:,} rows, {keys:,} distinct keys, states {states}; local API: "
        f"{accepted['messages']:,} messages for {accepted['values']:,} ledger ids"
    )
    return problems


# --- the report ---------------------------------------------------------------------------


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", "--carts", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--warehouse", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--baseline-messages", type=int, default=200)
    parser.add_argument(
        "--ceiling-messages", type=int, default=None, help="default: as many as mailflow sent"
    )
    parser.add_argument(
        "--runner",
        choices=("thread", "dask"),
        default="thread",
        help="where send batches run: the flow process's threads, or a local Dask cluster "
        "of MAILFLOW_DASK_WORKERS processes (MAILFLOW_TASK_RUNNER)",
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sample-ms", type=float, default=10.0, help="profiler interval")
    parser.add_argument("--flow-process", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flow_process:
        flow_process(args.flow_process, args.batch_size, args.sample_ms / 1000)
        return

    import psutil

    from mailflow.demo.seed import BENCH_PROFILE, seed_shop
    from mailflow.settings import get_settings
    from mailflow.sink.testing import running_sink
    from mailflow.warehouse.engine import make_engine

    load_before = load()
    print(f"load before: {load_before}")
    workdir = Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
    with warehouse(args.warehouse, workdir) as url:
        engine = make_engine(url)
        stats = seed_shop(engine, customers=args.recipients, seed=7, profile=BENCH_PROFILE)
        engine.dispose()
        print(
            f"seeded {stats.abandoned_candidates:,} abandoned carts ({args.warehouse}) "
            f"in {stats.seconds:.1f}s"
        )
        settings = get_settings()
        in_parallel = (
            settings.dask_workers * settings.dask_threads_per_worker
            if args.runner == "dask"
            else settings.task_threads
        )
        concurrency = settings.http_concurrency * in_parallel
        # keep=1000: the API holds only the newest messages; the tally counts them all.
        with running_sink(
            process=True, latency_ms=args.latency_ms, keep=1000, count_arg="ledger_id"
        ) as sink:
            loop_rate = sendgrid_loop(sink.url, sink.api_key, args.baseline_messages)
            sink.clear()
            api = psutil.Process(sink.pid)
            api_cpu0, api_requests0 = sum(api.cpu_times()[:2]), sink.stats()["requests"]
            env = {
                "MAILFLOW_WAREHOUSE_URL": url,
                "MAILFLOW_DEMO": "true",
                "MAILFLOW_SENDGRID_HOST": sink.url,
                "MAILFLOW_TASK_RUNNER": args.runner,
            }
            flow = run_flow_process(args, env, workdir)
            api_cpu = sum(api.cpu_times()[:2]) - api_cpu0
            api_requests = sink.stats()["requests"] - api_requests0
            load_after_flow = load()
            problems = check_ledger(url, sink.tally(values=True))
            if flow["second_sent"]:
                problems.append(f"the second run sent {flow['second_sent']} messages")
            sample = median_payload([m["payload"] for m in sink.messages(limit=1000)])
            sink.clear()
            ceiling_count = args.ceiling_messages or max(flow["sent"], 1000)
            ceiling_rate, ceiling_cpu = bare_client(
                sink.url, sink.api_key, sample, ceiling_count, concurrency
            )

    import orjson

    sent = flow["sent"]
    rate = sent / flow["flow_s"]
    cpu = flow["user_s"] + flow["sys_s"]
    print(
        f"\nabandoned-cart, {args.recipients:,} customers, {args.latency_ms:g} ms latency, "
        f"{args.warehouse}, {args.runner} runner; {concurrency} requests in flight "
        f"({in_parallel} batches × {settings.http_concurrency}); "
        f"batch {args.batch_size}; median payload {len(orjson.dumps(sample)):,} bytes"
    )
    print_table(
        [
            (
                "messages sent by mailflow",
                f"{sent:,} (found {flow['found']:,}, "
                f"planned {flow['planned']:,}, unknown {flow['unknown']}, failed {flow['failed']})",
            ),
            (
                "mailflow, flow start → end",
                f"{rate:,.0f} msg/s ({flow['flow_s']:.1f} s; "
                f"{flow['wall_s']:.1f} s with the flow run's start)",
            ),
            (
                "bare aiohttp client (ceiling)",
                f"{ceiling_rate:,.0f} msg/s ({ceiling_count:,} msgs, "
                f"{1e6 * ceiling_cpu / ceiling_count:,.0f} µs CPU/msg)",
            ),
            ("sendgrid-python loop", f"{loop_rate:,.1f} msg/s ({args.baseline_messages} msgs)"),
            ("mailflow / ceiling", f"{100 * rate / ceiling_rate:.0f} %"),
            ("mailflow / sendgrid-python", f"{rate / loop_rate:,.0f}×"),
            (
                "flow process CPU (user+sys)",
                f"{1e6 * cpu / max(sent, 1):,.0f} µs/msg "
                f"({flow['user_s']:.1f} s user + {flow['sys_s']:.1f} s sys)",
            ),
            (
                "flow process peak RSS",
                f"{flow['peak_rss_mb']:,.0f} MB in the sending run "
                f"({flow['peak_rss_both_mb']:,.0f} MB after the second run too)",
            ),
            (
                "CPU of its child processes",
                f"{flow['other_cpu_s']:.1f} s = {1e6 * flow['other_cpu_s'] / max(sent, 1):,.0f} "
                "µs/msg (Prefect server" + (", Dask workers)" if args.runner == "dask" else ")"),
            ),
            (
                "local API CPU",
                f"{1e6 * api_cpu / max(api_requests, 1):,.0f} µs/request "
                f"({api_cpu:.1f} s for {api_requests:,} requests)",
            ),
            ("load (1/5/15 min)", f"{load_before} before, {load_after_flow} after the flow"),
        ]
    )
    stages = flow["stages"]
    booked = sum(stages.values())
    print(
        f"\nflow process CPU by stage (sampled every {args.sample_ms:g} ms; "
        f"{booked:.1f} s booked of {cpu:.1f} s; profiler itself {flow['profiler_cpu_s']:.1f} s)"
    )
    print_table(
        [("stage", "  CPU s    µs/msg   % of CPU   % of wall")]
        + [
            (
                stage,
                f"{s:6.1f}  {1e6 * s / max(sent, 1):8.0f}  {100 * s / max(booked, 1e-9):8.1f}"
                f"  {100 * s / flow['flow_s']:9.1f}",
            )
            for stage, s in stages.items()
            if s > 0
        ]
    )
    print("\nwhere inside each stage (innermost function: CPU s)")
    for stage, spots in flow["hot_spots"].items():
        print(f"  {stage}: " + ", ".join(f"{where} {s:.1f}" for where, s in spots))
    if problems:
        print("\nCHECK FAILED: " + "; ".join(problems))
        sys.exit(1)
    print("\ncheck: one ledger row per key, one accepted message per ledger id, second run sent 0")


if __name__ == "__main__":
    main()
