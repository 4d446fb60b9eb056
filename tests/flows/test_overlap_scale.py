"""Two abandoned-cart runs started together over 10,000 carts send each cart once.

The runs are separate processes (as two workers, or a schedule overlapping a manual
run, would be), released at the same moment once both are ready; they share the
warehouse, the Prefect server and the local SendGrid API and nothing else. The
ledger's compare-and-set claim is all that keeps them apart.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import get_current_settings
from sqlalchemy import func, select

from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import send_ledger
from tests.shop import Shopper, build_shop

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

CARTS = 10_000
logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

# One run: import everything, say "ready", wait for "go" on stdin, run, print the summary.
RUN = """
import dataclasses, json, sys
from flows.abandoned_cart import abandoned_cart
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
summary = abandoned_cart(batch_size=500)
print("summary " + json.dumps(dataclasses.asdict(summary)), flush=True)
"""


def start_run(log: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)  # the `env` fixture's MAILFLOW_* settings
    # The test harness's Prefect server (and the rest of this process's Prefect settings).
    env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", RUN],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def read_line(run: subprocess.Popen[str], prefix: str, log: Path) -> str:
    assert run.stdout is not None
    for line in run.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    run.wait(60)
    pytest.fail(
        f"a run exited ({run.returncode}) before printing {prefix.strip()!r}; "
        f"its log:\n{log.read_text()[-6000:]}"
    )


def test_two_runs_started_together_send_each_of_10000_carts_once(env, sink, tmp_path: Path) -> None:
    build_shop(
        get_engine(),
        [Shopper(email=f"user{i}@example.com", first_name=f"User{i}") for i in range(CARTS)],
    )
    # Some latency, so the two runs' send phases overlap for a while.
    sink.set_faults(latency_ms=5)

    logs = [tmp_path / f"run{n}.log" for n in (1, 2)]
    runs = [start_run(log) for log in logs]
    try:
        for run, log in zip(runs, logs, strict=True):
            read_line(run, "ready", log)
        started = time.monotonic()
        for run in runs:
            assert run.stdin is not None
            run.stdin.write("go\n")
            run.stdin.flush()
        summaries: list[dict[str, Any]] = [
            json.loads(read_line(run, "summary ", log)) for run, log in zip(runs, logs, strict=True)
        ]
        elapsed = time.monotonic() - started  # reported, never asserted
        for run in runs:
            assert run.wait(120) == 0
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()

    logger.info(
        "sent per run: %s; both runs took %.1f s from go to summary",
        [s["sent"] for s in summaries],
        elapsed,
    )
    assert sum(s["sent"] for s in summaries) == CARTS
    assert all(s["error"] is None and s["unknown"] == 0 and not s["failed"] for s in summaries)
    with get_engine().connect() as conn:
        counts = conn.execute(
            select(send_ledger.c.status, func.count()).group_by(send_ledger.c.status)
        )
        by_status = {status: n for status, n in counts}
        ids = [r[0] for r in conn.execute(select(send_ledger.c.id))]
    assert by_status == {"sent": CARTS}

    accepted = sink.messages(limit=2 * CARTS)
    per_ledger_id = Counter(
        m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in accepted
    )
    assert per_ledger_id == Counter({str(i): 1 for i in ids})
    per_address = Counter(m["payload"]["personalizations"][0]["to"][0]["email"] for m in accepted)
    assert len(per_address) == CARTS and set(per_address.values()) == {1}
