"""Where a sending flow runs its render/send batches: threads, or a Dask cluster.

One setting decides, read when each flow run starts (so a deployment's worker
environment chooses, not the code)::

    MAILFLOW_TASK_RUNNER=thread   # default: MAILFLOW_TASK_THREADS batches at once in the
                                  # flow's own process
    MAILFLOW_TASK_RUNNER=dask     # prefect-dask: batches go to Dask worker processes
    MAILFLOW_DASK_ADDRESS=tcp://scheduler:8786   # an existing cluster; unset: each flow
                                  # run starts a LocalCluster of MAILFLOW_DASK_WORKERS
                                  # processes × MAILFLOW_DASK_THREADS_PER_WORKER threads

A flow opts in with ``task_runner=configured_task_runner()``. Batches are safe to run
anywhere: the ledger's compare-and-set claim decides which process sends a message,
and a run stopped by a refused key is visible to batches in other processes (see
``tasks/send.py``). Dask workers of an existing cluster need the project installed
and the same ``MAILFLOW_*`` environment as the Prefect worker (warehouse, SendGrid
host, key or Secret block name): they read their own settings.
"""

from __future__ import annotations

from typing import Any, NoReturn

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from mailflow.settings import Settings, get_settings

__all__ = ["ConfiguredTaskRunner", "build_task_runner", "configured_task_runner"]


def build_task_runner(settings: Settings) -> TaskRunner[Any]:
    """The task runner ``settings`` ask for (a new, not yet started instance)."""
    if settings.task_runner == "dask":
        # Imported here: the thread runner must not pay for importing distributed.
        from prefect_dask import DaskTaskRunner

        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": settings.dask_workers,
                "threads_per_worker": settings.dask_threads_per_worker,
                # Batches hold the GIL while rendering: processes, not threads, spread them.
                "processes": True,
                # The scheduler's HTTP endpoint (health, metrics; the dashboard needs bokeh)
                # on a free port: the default 8787 collides with any other cluster here.
                "dashboard_address": ":0",
            },
        )
    return ThreadPoolTaskRunner(max_workers=settings.task_threads)


class ConfiguredTaskRunner(TaskRunner[Any]):
    """A placeholder that becomes the configured runner when a flow run starts.

    Prefect starts every flow run with ``flow.task_runner.duplicate()``; this one
    returns the runner the settings ask for at that moment. It never runs tasks itself.
    """

    def duplicate(self) -> TaskRunner[Any]:  # type: ignore[override]
        return build_task_runner(get_settings())

    def submit(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "ConfiguredTaskRunner only stands in for the configured runner: Prefect "
            "replaces it when a flow run starts (duplicate()); submit to that one"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfiguredTaskRunner)

    def __hash__(self) -> int:
        return hash(ConfiguredTaskRunner)


def configured_task_runner() -> TaskRunner[Any]:
    """The task runner for sending flows: ``@flow(task_runner=configured_task_runner())``."""
    return ConfiguredTaskRunner()
