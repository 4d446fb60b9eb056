"""Validate stage: the trigger's Great Expectations suite, bad rows to quarantine."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from sqlalchemy import select

from mailflow.clock import utcnow
from mailflow.errors import DataQualityError
from mailflow.triggers import get_trigger
from mailflow.validation import ValidationOutcome, check_gate, validate_frame
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import quarantine

_INSERT_CHUNK = 5_000


@dataclass
class Validated:
    """Rows that passed, and how many failed, by rule."""

    frame: pd.DataFrame
    quarantined: dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0
    still_quarantined: int = 0  # quarantined by an earlier run, still bad
    gate_error: str | None = None


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return None if isinstance(value, float) and value != value else value
    return str(value)


def _already_quarantined(trigger_name: str, keys: list[str]) -> set[str]:
    """Which of ``keys`` an earlier run already quarantined for this trigger."""
    found: set[str] = set()
    cols = quarantine.c
    with get_engine().connect() as conn:
        for start in range(0, len(keys), 5_000):
            found.update(
                conn.execute(
                    select(cols.dedupe_key)
                    .where(
                        cols.trigger == trigger_name,
                        cols.dedupe_key.in_(keys[start : start + 5_000]),
                    )
                    .distinct()
                ).scalars()
            )
    return found


def quarantine_new(
    trigger_name: str, frame: pd.DataFrame, outcome: ValidationOutcome, flow_run_id: str | None
) -> tuple[ValidationOutcome, int]:
    """Write the violations no earlier run quarantined to ``mf_quarantine``.

    Returns the outcome the gate should judge (the new bad rows only, out of every row
    but the ones still bad from before) and how many rows an earlier run already
    quarantined.
    """
    known = (
        _already_quarantined(trigger_name, sorted({v.row_key for v in outcome.violations}))
        if outcome.violations
        else set()
    )
    fresh = [v for v in outcome.violations if v.row_key not in known]
    if fresh:
        now = utcnow()
        rows = []
        for v in fresh:
            src = frame.iloc[v.position]
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
                    "row": {k: _jsonable(src[k]) for k in frame.columns},
                    "created_at": now,
                }
            )
        with get_engine().begin() as conn:
            for start in range(0, len(rows), _INSERT_CHUNK):
                conn.execute(quarantine.insert(), rows[start : start + _INSERT_CHUNK])
    new_bad = len({v.row_key for v in fresh})
    still_bad = outcome.bad_rows - new_bad
    judged = replace(
        outcome,
        violations=fresh,
        bad_rows=new_bad,
        total_rows=outcome.total_rows - still_bad,
        counts=dict(Counter(v.rule for v in fresh)),
    )
    return judged, still_bad


@task(name="validate", cache_policy=NONE, persist_result=False)
def validate_recipients(
    trigger_name: str, frame: pd.DataFrame, flow_run_id: str | None, max_bad_share: float
) -> Validated:
    """Run the suite; write each new violation to ``mf_quarantine`` with the run id.

    A quarantined row comes back on every run until its data is fixed (then it is
    sent) or it leaves the trigger's window. Rows an earlier run already quarantined
    are validated again but neither recorded twice nor counted against the gate: the
    gate judges what is new, so one bad batch of data does not block every later run.

    The gate is checked *after* the quarantine is written, so a failed gate still
    leaves the evidence behind. A failed gate is returned as ``gate_error`` for the
    flow to raise once it has published its summary.
    """
    trigger = get_trigger(trigger_name)
    outcome = validate_frame(frame, trigger.suite, key_column="dedupe_key")
    judged, still_bad = quarantine_new(trigger_name, frame, outcome, flow_run_id)
    counts = judged.counts
    new_bad = judged.bad_rows
    logger = get_run_logger()
    if outcome.bad_rows:
        logger.warning(
            "%s: quarantined %d new rows of %d (%s); %d quarantined earlier are still bad "
            "— see table mf_quarantine",
            trigger_name,
            new_bad,
            outcome.total_rows,
            ", ".join(f"{k}={n}" for k, n in sorted(counts.items())) or "none",
            still_bad,
        )
    gate_error = None
    try:
        check_gate(judged, max_bad_share=max_bad_share)
    except DataQualityError as exc:  # raised by the flow once the summary is out
        gate_error = str(exc)
    return Validated(
        frame=outcome.good,
        quarantined=dict(counts),
        bad_rows=new_bad,
        still_quarantined=still_bad,
        gate_error=gate_error,
    )
