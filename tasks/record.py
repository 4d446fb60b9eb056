"""Record stage: the run summary — a warehouse row, a Prefect table artifact, a log line."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from mailflow.pipeline import resources, summary
from mailflow.pipeline.campaign import artifact_key
from mailflow.pipeline.summary import RunSummary


@task(name="record-summary", cache_policy=NONE, persist_result=False)
def record_summary(run: RunSummary, started_at: datetime) -> RunSummary:
    """Complete the summary from the ledger, then publish it three ways."""
    run = summary.complete(resources.current(), run, started_at)
    key = (
        artifact_key(run.campaign, "summary")
        if run.campaign is not None
        else f"{run.trigger.replace('_', '-')}-summary"
    )
    create_table_artifact(key=key, table=run.rows(), description=run.description())
    get_run_logger().info("summary %s", run.line())
    return run
