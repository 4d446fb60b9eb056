"""Answer a campaign run's approval form from another thread (tests and the benchmark)."""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run


def resume_when_paused(
    name: str, run_input: dict[str, Any], *, limit_s: float = 120
) -> threading.Thread:
    """From another thread: wait for the campaign's run to pause, then answer its form."""
    errors: list[BaseException] = []

    def answer() -> None:
        deadline = time.monotonic() + limit_s
        paused = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
        )
        try:
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    for run in client.read_flow_runs(flow_run_filter=paused):
                        if run.parameters.get("name") == name:
                            resume_flow_run(run.id, run_input=run_input)
                            return
                    time.sleep(0.2)
        except BaseException as exc:  # surfaced by the test through the thread's list
            errors.append(exc)

    thread = threading.Thread(target=answer, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread
