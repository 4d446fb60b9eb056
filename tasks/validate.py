"""Validate stage: the trigger's Great Expectations suite, bad rows to quarantine."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.pipeline import audience, resources
from mailflow.pipeline.audience import Validated
from mailflow.triggers import get_trigger


@task(name="validate", cache_policy=NONE, persist_result=False)
def validate_recipients(
    trigger_name: str, frame: pd.DataFrame, flow_run_id: str | None, max_bad_share: float
) -> Validated:
    """Run the suite, quarantine new bad rows, judge the gate (see ``audience.validate``)."""
    result = audience.validate(
        resources.current(),
        get_trigger(trigger_name),
        frame,
        flow_run_id=flow_run_id,
        max_bad_share=max_bad_share,
    )
    if result.all_bad:
        get_run_logger().warning(
            "%s: quarantined %d new rows of %d (%s); %d quarantined earlier are still bad "
            "— see table mf_quarantine",
            trigger_name,
            result.bad_rows,
            len(frame),
            ", ".join(f"{k}={n}" for k, n in sorted(result.quarantined.items())) or "none",
            result.still_quarantined,
        )
    return result
