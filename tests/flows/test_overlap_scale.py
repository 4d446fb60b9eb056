"""Two abandoned-cart runs started together over 10,000 carts reach each cart once.

The runs are separate processes (as two workers, or a schedule overlapping a manual
run, would be), released at the same moment once both are ready; they share the
warehouse, the Prefect server and the local SendGrid API and nothing else. The
ledger's compare-and-set claim is all that keeps them apart.

Some answers are lost on the way, as on a loaded machine or a bad network: the local
API answers a share of requests after the client's timeout (accepted, but the client
cannot know) and drops a share of connections after the request left (not accepted).
Those sends end ``unknown``. The API posts signed events to the real webhook, which
confirms the accepted ones; a third run after the grace period sends the others once.
In the end every cart has reached the API exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import get_current_settings
from sqlalchemy import func, select

from flows.abandoned_cart import abandoned_cart
from mailflow.settings import get_settings
from mailflow.sink.testing import SinkHandle
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import ledger_history, send_ledger
from tests.events import hooked_sink, wait_for_events
from tests.ledger import sent_per_ledger_id
from tests.shop import Shopper, build_shop

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

CARTS = 10_000
TIMEOUT_S = 2.0
GRACE_S = 5.0
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


@pytest.fixture
def sink(warehouse_url: str) -> Iterator[SinkHandle]:
    """The local SendGrid API posting signed events to the webhook (overrides conftest's)."""
    with hooked_sink(warehouse_url, open_rate=0.0, click_rate=0.0, events_seed=7) as handle:
        yield handle


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


def history_counts() -> Counter[str]:
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(ledger_history.c.decision, func.count()).group_by(ledger_history.c.decision)
        )
        return Counter({decision: n for decision, n in rows})


def test_two_runs_started_together_reach_each_of_10000_carts_once(
    env: pytest.MonkeyPatch, sink: SinkHandle, tmp_path: Path
) -> None:
    env.setenv("MAILFLOW_EVENT_WEBHOOK", "true")
    env.setenv("MAILFLOW_RECONCILE_GRACE_S", str(GRACE_S))
    env.setenv("MAILFLOW_HTTP_TIMEOUT_S", str(TIMEOUT_S))
    get_settings.cache_clear()
    build_shop(
        get_engine(),
        [Shopper(email=f"user{i}@example.com", first_name=f"User{i}") for i in range(CARTS)],
    )
    # Some latency, so the two runs' send phases overlap for a while; ~0.5 % of answers
    # come after the client's timeout and ~0.3 % of connections drop.
    sink.set_faults(
        latency_ms=5, slow_rate=0.005, slow_ms=TIMEOUT_S * 1000 + 500, drop_rate=0.003, seed=11
    )

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

    sent = sum(s["sent"] for s in summaries)
    unknown = sum(s["unknown"] for s in summaries)
    logger.info(
        "sent per run: %s, unknown per run: %s; both runs took %.1f s from go to summary",
        [s["sent"] for s in summaries],
        [s["unknown"] for s in summaries],
        elapsed,
    )
    # Every cart was taken by exactly one run, and each send was answered or is unknown.
    assert sent + unknown == CARTS
    assert unknown > 0  # the faults above make sure the reconciliation path is taken
    assert all(s["error"] is None and not s["failed"] for s in summaries)

    # The webhook confirms the accepted ones as their events arrive (some before their
    # run ended, so its summary counts them sent). The rest waits for the grace period;
    # then the next run sends each of them once.
    wait_for_events(sink, timeout=180)
    time.sleep(GRACE_S + 0.5)
    sink.reset_faults()
    third = abandoned_cart(batch_size=500)
    decisions = history_counts()
    logger.info("reconciliation decisions: %s; the third run: %s", decisions, third.reconciled)
    resent = third.reconciled.get("sent again (never accepted)", 0)
    # Both ways out of ambiguity were taken: answers after the timeout were accepted and
    # confirmed by their events; dropped connections were never accepted and resent.
    assert decisions["confirmed"] > 0 and resent > 0
    assert decisions["resend"] == resent == third.sent
    assert decisions["confirmed"] + resent >= unknown
    assert third.unresolved == 0 and third.error is None
    with get_engine().connect() as conn:
        confirmed_rows = conn.execute(
            select(func.count()).where(send_ledger.c.reason.like("confirmed by event %"))
        ).scalar_one()
    assert confirmed_rows == decisions["confirmed"]

    with get_engine().connect() as conn:
        counts = conn.execute(
            select(send_ledger.c.status, func.count()).group_by(send_ledger.c.status)
        )
        by_status = {status: n for status, n in counts}
        ids = [r[0] for r in conn.execute(select(send_ledger.c.id))]
    assert by_status == {"sent": CARTS}
    # Exactly once at the API: no cart twice, none missing.
    assert sent_per_ledger_id(sink) == Counter({str(i): 1 for i in ids})
    accepted = sink.messages(limit=2 * CARTS)
    per_address = Counter(m["payload"]["personalizations"][0]["to"][0]["email"] for m in accepted)
    assert len(per_address) == CARTS and set(per_address.values()) == {1}
