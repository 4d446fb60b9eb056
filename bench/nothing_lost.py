"""Nothing lost, nothing twice: the abandoned-cart flow killed with SIGKILL, and a fault storm.

Seeds N abandoned carts (the BENCH shop profile) into a fresh SQLite warehouse per
scenario, starts the local SendGrid API in its own process (fixed latency; signed
events posted to the real webhook app, which writes them into the warehouse) and a
Prefect server (Prefect's test harness). Every flow run is a child process, as a
worker would start it.

- **kill -9**, twice: with the answers written once per batch (``settle_every`` at
  least the batch size: how mailflow worked before) as the baseline, then with the
  default groups of 25 and rows claimed as they go out. Each time the flow is killed
  ``--kills`` times at random moments while it is sending (the ledger has rows in
  ``sending``); the rows left ambiguous are counted right after each kill. Then runs
  follow until every row is ``sent``: the next run marks the dead claims ``unknown``
  (lease), events confirm the accepted ones, the rest go back to ``planned`` after the
  grace period and are sent once.
- **fault storm**: 503s, 429s (a rate limit), dropped connections and answers after
  the client's timeout at once, beside a clean run of the same size; runs until done.

For every scenario: duplicates at the API (must be 0), messages never delivered (must
be 0), and the time until all are resolved. The lease and the grace period are cut to
seconds here (``--lease-s``, ``--grace-s``; 30 minutes each by default) so the bench
ends in minutes.

    .venv/bin/python bench/nothing_lost.py --carts 10000 --latency-ms 50 --kills 4
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The guardrail is overridden: the local API's random bounces and spam reports over a
# few thousand messages would trip it, and deliverability is not what is measured here.
RUN = (
    "from flows.abandoned_cart import abandoned_cart; "
    "abandoned_cart(batch_size={batch}, override_guardrail=True)"
)
MAX_RUNS = 30


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    rows: int = 0
    ambiguous_after_kill: list[int] = field(default_factory=list)
    runs: int = 0
    resolve_s: float = 0.0  # from the last kill (or the first start) until all are sent
    duplicates: int = 0
    lost: int = 0
    states: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        kills = (
            f"ambiguous after each kill {self.ambiguous_after_kill} "
            f"(mean {sum(self.ambiguous_after_kill) / len(self.ambiguous_after_kill):,.0f}); "
            if self.ambiguous_after_kill
            else ""
        )
        return (
            f"{self.name}: {self.rows:,} messages; {kills}all resolved {self.resolve_s:.1f} s "
            f"later after {self.runs} runs; duplicates at the API {self.duplicates}, "
            f"never delivered {self.lost}; ledger {self.states}; decisions {self.decisions}"
        )


class Scenario:
    """One fresh warehouse, sink and webhook; flow runs as child processes."""

    def __init__(self, args: argparse.Namespace, workdir: Path, name: str, **env: str) -> None:
        self.args, self.name = args, name
        self.url = f"sqlite:///{workdir / f'{name}.db'}"
        self.env = {
            "MAILFLOW_WAREHOUSE_URL": self.url,
            "MAILFLOW_DEMO": "true",
            "MAILFLOW_EVENT_WEBHOOK": "true",
            "MAILFLOW_CLAIM_LEASE_S": str(args.lease_s),
            "MAILFLOW_RECONCILE_GRACE_S": str(args.grace_s),
            "MAILFLOW_SEND_TASK_RETRY_DELAYS_S": "[1, 2, 4]",
            **env,
        }
        self.log = workdir / f"{name}.log"

    @contextmanager
    def running(self, **faults: Any) -> Iterator[Any]:
        from mailflow.demo.seed import BENCH_PROFILE, seed_shop
        from mailflow.sink.testing import running_sink
        from mailflow.warehouse.engine import make_engine
        from mailflow.warehouse.migrate import upgrade
        from mailflow.webhook.server import running_webhook
        from mailflow.webhook.signing import generate_keypair, private_key_pem

        upgrade(self.url)
        self.engine = make_engine(self.url)
        seed_shop(self.engine, customers=self.args.carts, seed=7, profile=BENCH_PROFILE)
        key, public_b64 = generate_keypair()
        with (
            running_webhook(self.engine, public_b64) as events_url,
            running_sink(
                process=True,
                latency_ms=self.args.latency_ms,
                webhook_url=events_url,
                webhook_private_key=private_key_pem(key),
                open_rate=0.0,
                click_rate=0.0,
                seed=5,
                **faults,
            ) as sink,
        ):
            self.env["MAILFLOW_SENDGRID_HOST"] = sink.url
            yield sink
        self.engine.dispose()

    def start(self) -> subprocess.Popen[bytes]:
        from prefect.settings import get_current_settings

        env = dict(os.environ)
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        env.update(self.env)
        with self.log.open("a") as out:
            return subprocess.Popen(
                [sys.executable, "-c", RUN.format(batch=self.args.batch_size)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=out,
            )

    def states(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from mailflow.warehouse.schema import send_ledger

        with self.engine.connect() as conn:
            rows = conn.execute(
                select(send_ledger.c.status, func.count()).group_by(send_ledger.c.status)
            )
            return {str(s): int(n) for s, n in rows}

    def sending_since(self, started: Any) -> int:
        """Rows in ``sending`` claimed at or after ``started`` (by the run started then)."""
        from sqlalchemy import func, select

        from mailflow.warehouse.schema import send_ledger

        cols = send_ledger.c
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(cols.status == "sending", cols.claimed_at >= started)
                ).scalar_one()
            )

    def kill_while_sending(self, rng: random.Random) -> int:
        """Start a run, SIGKILL it at a random moment while it sends; rows it left ambiguous."""
        from mailflow.clock import utcnow

        time.sleep(self.args.lease_s)  # a restart after the lease: the new run takes over
        started = utcnow()
        run = self.start()
        deadline = time.monotonic() + 300
        while self.sending_since(started) == 0:
            if run.poll() is not None or time.monotonic() > deadline:
                return 0  # finished (or died) before it was caught sending
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, self.args.kill_window_s))
        run.send_signal(signal.SIGKILL)
        run.wait()
        return self.sending_since(started)

    def run_until_done(self, out: Outcome, sink: Any, since: float) -> None:
        while out.runs < MAX_RUNS:
            out.runs += 1
            self.start().wait()
            states = self.states()
            if set(states) == {"sent"}:
                break
            time.sleep(1.0)  # events and the grace period
        out.resolve_s = time.monotonic() - since
        self.count(out, sink)

    def count(self, out: Outcome, sink: Any) -> None:
        from sqlalchemy import func, select

        from mailflow.warehouse.schema import ledger_history, send_ledger

        per_id: Counter[str] = Counter()
        offset = 0
        while page := sink.messages(limit=5000, offset=offset):
            offset += len(page)
            per_id.update(
                m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in page
            )
        with self.engine.connect() as conn:
            ids = [str(i) for i in conn.execute(select(send_ledger.c.id)).scalars()]
            out.decisions = {
                str(d): int(n)
                for d, n in conn.execute(
                    select(ledger_history.c.decision, func.count()).group_by(
                        ledger_history.c.decision
                    )
                )
            }
        out.rows = len(ids)
        out.duplicates = sum(n - 1 for n in per_id.values() if n > 1)
        out.lost = sum(1 for i in ids if per_id[i] == 0)
        out.states = self.states()


def kill_scenario(args: argparse.Namespace, workdir: Path, name: str, settle_every: int) -> Outcome:
    out = Outcome(name)
    sc = Scenario(args, workdir, name, MAILFLOW_SETTLE_EVERY=str(settle_every))
    rng = random.Random(args.seed)
    with sc.running() as sink:
        last = time.monotonic()
        for _ in range(args.kills):
            out.ambiguous_after_kill.append(sc.kill_while_sending(rng))
            last = time.monotonic()
        sc.run_until_done(out, sink, last)
    return out


def storm_scenario(args: argparse.Namespace, workdir: Path, name: str, **faults: Any) -> Outcome:
    out = Outcome(name)
    sc = Scenario(args, workdir, name, MAILFLOW_HTTP_TIMEOUT_S="2")
    with sc.running(**faults) as sink:
        sc.run_until_done(out, sink, time.monotonic())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carts", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--kill-window-s", type=float, default=3.0)
    parser.add_argument("--lease-s", type=float, default=3.0)
    parser.add_argument("--grace-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-storm", action="store_true")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    workdir = Path(tempfile.mkdtemp(prefix="mailflow-nothing-lost-"))
    results: list[Outcome] = []
    with prefect_test_harness(server_startup_timeout=60):
        for name, every in (
            ("kill-9, settled per batch (before)", 1000),
            ("kill-9, settled in groups of 25 (now)", 25),
        ):
            results.append(kill_scenario(args, workdir, name, every))
            print(results[-1].line(), flush=True)
        if not args.skip_storm:
            results.append(storm_scenario(args, workdir, "clean run (baseline)"))
            print(results[-1].line(), flush=True)
            storm = {
                "error_rate_503": 0.05,
                "drop_rate": 0.01,
                "slow_rate": 0.01,
                "slow_ms": 2500.0,
                "rate_limit": 1500,
            }
            results.append(storm_scenario(args, workdir, f"fault storm {storm}", **storm))
            print(results[-1].line(), flush=True)
    before, after = results[0], results[1]
    if before.ambiguous_after_kill and after.ambiguous_after_kill:
        b = sum(before.ambiguous_after_kill) / len(before.ambiguous_after_kill)
        a = sum(after.ambiguous_after_kill) / len(after.ambiguous_after_kill)
        print(
            f"rows ambiguous after a kill: {b:,.0f} before, {a:,.0f} now "
            f"({b / max(a, 1):,.1f}x fewer)"
        )
    bad = [r.name for r in results if r.duplicates or r.lost or set(r.states) != {"sent"}]
    print("FAILED: " + "; ".join(bad) if bad else "every scenario: 0 duplicates, 0 lost")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
