"""The abandoned-cart flow with its batches on a real multi-process Dask cluster.

MAILFLOW_TASK_RUNNER=dask sends the render/send batches to Dask worker processes:
they claim from the same ledger, so each cart is still sent once, and a run stopped
by a refused key stops the batches in the other processes too.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from prefect import flow

from flows.abandoned_cart import abandoned_cart
from mailflow.errors import FatalRunError
from mailflow.runners import configured_task_runner
from mailflow.settings import get_settings
from mailflow.warehouse.engine import get_engine
from tasks.send import send_batch
from tests.ledger import ledger_rows, sent_per_ledger_id
from tests.shop import Shopper, build_shop

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def shoppers(n: int) -> list[Shopper]:
    return [Shopper(email=f"user{i}@example.com", first_name=f"User{i}") for i in range(n)]


def test_batches_on_dask_worker_processes_send_each_cart_once(env, sink) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    build_shop(get_engine(), shoppers(90))
    sink.set_faults(latency_ms=5)
    # An existing cluster (MAILFLOW_DASK_ADDRESS), started after `env` so its worker
    # processes inherit the test's MAILFLOW_* settings, as production workers must.
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        env.setenv("MAILFLOW_TASK_RUNNER", "dask")
        env.setenv("MAILFLOW_DASK_ADDRESS", cluster.scheduler_address)
        get_settings.cache_clear()
        with get_task_stream(client) as stream:
            first = abandoned_cart(batch_size=10)
        second = abandoned_cart(batch_size=10)
        worker_pids = client.run(os.getpid)

    assert first.sent == 90 and first.planned == 90
    rows = ledger_rows()
    assert len(rows) == 90 and {r.status for r in rows} == {"sent"}
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})
    # The rerun finds every cart notified and sends nothing.
    assert second.sent == 0 and second.planned == 0
    assert second.excluded == {"already_notified": 90}
    assert len(sink.messages(limit=10_000)) == 90
    # The 9 batches ran as Dask tasks in the worker processes, not in this one.
    batches = [t for t in stream.data if "send" in str(t["key"])]
    assert len(batches) == 9
    assert {t["worker"] for t in batches} <= set(worker_pids)
    assert os.getpid() not in worker_pids.values()


def test_refused_key_stops_batches_in_other_processes(env, sink) -> None:
    # No address: each flow run starts its own LocalCluster of worker processes.
    env.setenv("MAILFLOW_TASK_RUNNER", "dask")
    env.setenv("MAILFLOW_DASK_WORKERS", "2")
    env.setenv("MAILFLOW_DASK_THREADS_PER_WORKER", "1")
    env.setenv("MAILFLOW_SENDGRID_API_KEY", "SG.revoked-key")
    get_settings.cache_clear()
    build_shop(get_engine(), shoppers(40))

    with pytest.raises(FatalRunError, match="API key"):
        abandoned_cart(batch_size=5)

    rows = ledger_rows()
    assert len(rows) == 40 and {r.status for r in rows} == {"planned"}
    assert sink.messages() == []
    # At most one batch per worker thread meets the refusal; the later ones stop.
    assert 1 <= sink.stats()["rejected"].get("401", 0) <= 2 * 5
    (stopped_run,) = {r.flow_run_id for r in rows if r.attempts}

    # A batch of the stopped run that starts late, in a fresh worker process that never
    # saw the refusal, finds the run's stop mark in the ledger and sends nothing, even
    # though the key works again.
    env.delenv("MAILFLOW_SENDGRID_API_KEY")
    get_settings.cache_clear()
    assert late_batch_of(stopped_run, [r.id for r in rows]) == 0
    assert sink.messages() == []

    again = abandoned_cart(batch_size=5)
    assert again.sent == 40
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})


@flow(task_runner=configured_task_runner())
def late_batch_of(flow_run_id: str, ledger_ids: list[int]) -> int:
    """Run one send batch on behalf of ``flow_run_id``; returns the rows it claimed."""
    report = send_batch.submit("abandoned_cart", ledger_ids, 1, flow_run_id).result()
    return report.claimed
