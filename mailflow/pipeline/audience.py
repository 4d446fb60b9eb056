"""Audience: extract (SQL with exclusions), validate (the trigger's suite), quarantine.

Triggers and campaigns both take their audience from here: the shared exclusions of
:mod:`mailflow.extract`, then the same Great Expectations suite, the same quarantine
table and the same data-quality gate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select

from mailflow.clock import utcnow
from mailflow.errors import DataQualityError
from mailflow.extract import Extracted, extract
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger
from mailflow.validation import ValidationOutcome, check_gate, validate_frame
from mailflow.warehouse.schema import quarantine

_CHUNK = 5_000


def find(res: Resources, trigger: Trigger, params: Mapping[str, Any], now: datetime) -> Extracted:
    """Eligible candidates of ``trigger`` now, with found/excluded counts."""
    with res.engine.connect() as conn:
        return extract(
            conn, trigger, now=now, params=params, frequency_cap=res.settings.frequency_cap
        )


@dataclass
class Validated:
    """Rows that passed, and what failed (new failures by rule)."""

    frame: pd.DataFrame
    quarantined: dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0  # new bad rows (counted by the gate)
    still_quarantined: int = 0  # quarantined by an earlier run, still bad
    gate_error: str | None = None

    @property
    def all_bad(self) -> int:
        return self.bad_rows + self.still_quarantined


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return None if isinstance(value, float) and value != value else value
    return str(value)


def _already_quarantined(res: Resources, trigger_name: str, keys: list[str]) -> set[str]:
    """Which of ``keys`` an earlier run already quarantined for this trigger."""
    found: set[str] = set()
    cols = quarantine.c
    with res.engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            found.update(
                conn.execute(
                    select(cols.dedupe_key)
                    .where(
                        cols.trigger == trigger_name,
                        cols.dedupe_key.in_(keys[start : start + _CHUNK]),
                    )
                    .distinct()
                ).scalars()
            )
    return found


def quarantine_new(
    res: Resources,
    trigger_name: str,
    frame: pd.DataFrame,
    outcome: ValidationOutcome,
    flow_run_id: str | None,
) -> tuple[ValidationOutcome, int]:
    """Write the violations no earlier run quarantined to ``mf_quarantine``.

    Returns the outcome the gate should judge (the new bad rows only, out of every row
    but the ones still bad from before) and how many rows an earlier run already
    quarantined.
    """
    known = (
        _already_quarantined(res, trigger_name, sorted({v.row_key for v in outcome.violations}))
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
        with res.engine.begin() as conn:
            for start in range(0, len(rows), _CHUNK):
                conn.execute(quarantine.insert(), rows[start : start + _CHUNK])
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


def validate(
    res: Resources,
    trigger: Trigger,
    frame: pd.DataFrame,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    record: bool = True,
) -> Validated:
    """Run the suite; with ``record``, write each new violation to ``mf_quarantine``.

    A quarantined row comes back on every run until its data is fixed (then it is
    sent) or it leaves the trigger's window. Rows an earlier run already quarantined
    are validated again but neither recorded twice nor counted against the gate: the
    gate judges what is new, so one bad batch of data does not block every later run.
    Without ``record`` (a CLI preview) nothing is written and every bad row counts.

    The gate is checked *after* the quarantine is written, so a failed gate still
    leaves the evidence behind; it is returned as ``gate_error`` for the caller to raise
    once its summary is out.
    """
    outcome = validate_frame(frame, trigger.suite, key_column="dedupe_key")
    judged, still_bad = outcome, 0
    if record:
        judged, still_bad = quarantine_new(res, trigger.name, frame, outcome, flow_run_id)
    gate_error = None
    try:
        check_gate(judged, max_bad_share=max_bad_share)
    except DataQualityError as exc:
        gate_error = str(exc)
    return Validated(
        frame=outcome.good,
        quarantined={k: v for k, v in judged.counts.items() if v},
        bad_rows=judged.bad_rows,
        still_quarantined=still_bad,
        gate_error=gate_error,
    )
