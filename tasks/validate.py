"""Validate stage: the trigger's Great Expectations suite, bad rows to quarantine."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow.errors import DataQualityError
from mailflow.ledger import utcnow
from mailflow.triggers import get_trigger
from mailflow.validation import check_gate, validate_frame
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import quarantine

_QUARANTINE_COLUMNS = ("dedupe_key", "customer_id", "email")


@dataclass
class Validated:
    """Rows that passed, and how many failed, by rule."""

    frame: pd.DataFrame
    quarantined: dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0
    gate_error: str | None = None


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return None if isinstance(value, float) and value != value else value
    return str(value)


@task(name="validate", cache_policy=NONE, persist_result=False)
def validate_recipients(
    trigger_name: str, frame: pd.DataFrame, flow_run_id: str | None, max_bad_share: float
) -> Validated:
    """Run the suite; write every violation to ``mf_quarantine`` with the run id.

    The gate is checked *after* the quarantine is written, so a failed gate still
    leaves the evidence behind. A failed gate is returned as ``gate_error`` for the
    flow to raise once it has published its summary.
    """
    trigger = get_trigger(trigger_name)
    outcome = validate_frame(frame, trigger.suite, key_column="dedupe_key")
    if outcome.violations:
        now = utcnow()
        rows = []
        for v in outcome.violations:
            src = frame.iloc[v.position]
            record = {k: _jsonable(src[k]) for k in frame.columns}
            rows.append(
                {
                    "flow_run_id": flow_run_id,
                    "trigger": trigger_name,
                    "dedupe_key": v.row_key,
                    "customer_id": _jsonable(src.get("customer_id")),
                    "email": _jsonable(src.get("email")),
                    "expectation": v.expectation,
                    "column_name": v.column,
                    "reason": v.reason,
                    "row": record,
                    "created_at": now,
                }
            )
        with get_engine().begin() as conn:
            conn.execute(quarantine.insert(), rows)
    logger = get_run_logger()
    if outcome.bad_rows:
        logger.warning(
            "%s: quarantined %d of %d rows (%.2f%%): %s — see table mf_quarantine",
            trigger_name,
            outcome.bad_rows,
            outcome.total_rows,
            100 * outcome.bad_share,
            ", ".join(f"{k}={n}" for k, n in sorted(outcome.counts.items())),
        )
    gate_error = None
    try:
        check_gate(outcome, max_bad_share=max_bad_share)
    except DataQualityError as exc:  # raised by the flow once the summary is out
        gate_error = str(exc)
    return Validated(
        frame=outcome.good,
        quarantined={rule: n for rule, n in outcome.counts.items() if n},
        bad_rows=outcome.bad_rows,
        gate_error=gate_error,
    )
