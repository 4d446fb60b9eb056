"""Suppression sync stage: SendGrid's lists into the warehouse, local unsubscribes out."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.pipeline import resources
from mailflow.provider_suppressions import SendGridSuppressions, sync
from tasks.send import retry_only_transient


@task(
    name="sync-suppressions",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_only_transient,  # a refused key (401/403) stops at once
    persist_result=False,
)
def sync_suppressions(page_size: int, push_chunk: int, flow_run_id: str | None) -> dict[str, Any]:
    """Pull every SendGrid suppression list, push mailflow's unsubscribes; counts."""
    found = resources.current()
    with SendGridSuppressions.from_settings(found.settings, page_size=page_size) as client:
        result = sync(found.engine, client, push_chunk=push_chunk, flow_run_id=flow_run_id)
    logger = get_run_logger()
    for name, pulled in result.pulled.items():
        logger.info(
            "sendgrid:%s: %d fetched in %d pages, %d added, %d upgraded, %d without an address",
            name,
            pulled.fetched,
            pulled.pages,
            pulled.added,
            pulled.upgraded,
            pulled.invalid,
        )
    logger.info("pushed %d local unsubscribes to SendGrid's global unsubscribes", result.pushed)
    return result.counts()
