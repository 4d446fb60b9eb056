"""Extract stage: the trigger's query, with exclusions counted by reason."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.extract import Extracted
from mailflow.pipeline import audience, resources
from mailflow.triggers import get_trigger


@task(name="extract", cache_policy=NONE, persist_result=False)
def extract_recipients(trigger_name: str, params: dict[str, Any], now: datetime) -> Extracted:
    """Eligible recipients of ``trigger_name`` now, plus found/excluded counts."""
    result = audience.find(resources.current(), get_trigger(trigger_name), params, now)
    get_run_logger().info(
        "%s: found %d candidates, %d eligible; excluded: %s",
        trigger_name,
        result.found,
        len(result.frame),
        ", ".join(f"{k}={v}" for k, v in sorted(result.excluded.items())) or "none",
    )
    return result
