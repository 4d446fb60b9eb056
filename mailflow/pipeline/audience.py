"""Audience: extract (SQL with exclusions), validate (the trigger's suite), quarantine.

Triggers and campaigns both take their audience from here: the shared exclusions of
:mod:`mailflow.extract`, then the same Great Expectations suite, the same quarantine
table and the same data-quality gate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select

from mailflow.clock import utcnow
from mailflow.errors import DataQualityError
from mailflow.extract import Extracted, build_queries, count, eligible_chunks, extract
from mailflow.pipeline.resources import Resources
from mailflow.triggers.base import Trigger
from mailflow.validation import (
    SeenValues,
    ValidationOutcome,
    Violation,
    check_gate,
    validate_frame,
)
from mailflow.warehouse.schema import quarantine

_CHUNK = 5_000

#: Rows per chunk of a streamed audience: big enough that GX's fixed cost per validation
#: (tens of milliseconds) is small per row, small enough that a chunk with its render
#: contexts stays a few megabytes.
CHUNK_ROWS = 20_000


def find(res: Resources, trigger: Trigger, params: Mapping[str, Any], now: datetime) -> Extracted:
    """Eligible candidates of ``trigger`` now, with found/excluded counts."""
    with res.engine.connect() as conn:
        return extract(
            conn, trigger, now=now, params=params, frequency_cap=res.settings.frequency_cap
        )


@dataclass
class Validated:
    """Rows that passed, and what failed (new failures by rule)."""

    frame: pd.DataFrame  # the good rows; empty when the audience was streamed to the ledger
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


class Validation:
    """Validate one run's audience chunk by chunk, in priority order; the gate at the end.

    Each chunk goes through the trigger's suite (uniqueness holds across chunks, see
    :class:`mailflow.validation.SeenValues`) and, with ``record``, its new violations go to
    ``mf_quarantine`` at once. :meth:`result` adds up the counts and judges the gate over the
    whole audience, exactly as if it had been validated in one frame. Memory holds one
    chunk, the per-rule counts, one example violation per rule and the kept unique values.
    """

    def __init__(
        self,
        res: Resources,
        trigger: Trigger,
        *,
        flow_run_id: str | None,
        max_bad_share: float,
        record: bool = True,
        chunked: bool = True,
    ) -> None:
        """``chunked=False``: the caller passes the whole audience as one chunk (needed when
        the suite has a ``keep="last"`` rule, see ``Suite.streamable``)."""
        self._res, self._trigger = res, trigger
        self._run, self._max_bad_share, self._record = flow_run_id, max_bad_share, record
        self._seen = SeenValues() if chunked else None
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, Violation] = {}
        self._bad = self._total = self._still = 0

    def chunk(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Validate the next chunk; its good rows (the caller plans them)."""
        outcome = validate_frame(
            frame, self._trigger.suite, key_column="dedupe_key", seen=self._seen
        )
        judged, still_bad = outcome, 0
        if self._record:
            judged, still_bad = quarantine_new(
                self._res, self._trigger.name, frame, outcome, self._run
            )
        self._bad += judged.bad_rows
        self._total += judged.total_rows
        self._still += still_bad
        self._counts.update(judged.counts)
        for v in judged.violations:
            self._examples.setdefault(v.rule, v)
        return outcome.good

    def result(self, good: pd.DataFrame | None = None) -> Validated:
        """The totals, with the gate judged over every chunk (``gate_error`` if it failed)."""
        judged = ValidationOutcome(
            good=pd.DataFrame(),
            violations=list(self._examples.values()),
            bad_rows=self._bad,
            total_rows=self._total,
            counts=dict(self._counts),
            suite=self._trigger.suite.name,
        )
        gate_error = None
        try:
            check_gate(judged, max_bad_share=self._max_bad_share)
        except DataQualityError as exc:
            gate_error = str(exc)
        return Validated(
            frame=pd.DataFrame() if good is None else good,
            quarantined={k: v for k, v in self._counts.items() if v},
            bad_rows=self._bad,
            still_quarantined=self._still,
            gate_error=gate_error,
        )


def validate(
    res: Resources,
    trigger: Trigger,
    frame: pd.DataFrame,
    *,
    flow_run_id: str | None,
    max_bad_share: float,
    record: bool = True,
) -> Validated:
    """Run the suite over ``frame`` in one piece; with ``record``, write each new violation
    to ``mf_quarantine``.

    A quarantined row comes back on every run until its data is fixed (then it is
    sent) or it leaves the trigger's window. Rows an earlier run already quarantined
    are validated again but neither recorded twice nor counted against the gate: the
    gate judges what is new, so one bad batch of data does not block every later run.
    Without ``record`` (a CLI preview) nothing is written and every bad row counts.

    The gate is checked *after* the quarantine is written, so a failed gate still
    leaves the evidence behind; it is returned as ``gate_error`` for the caller to raise
    once its summary is out. (A trigger's run streams its audience through
    :class:`Validation` instead; a campaign, which previews its audience, uses this.)
    """
    validation = Validation(
        res,
        trigger,
        flow_run_id=flow_run_id,
        max_bad_share=max_bad_share,
        record=record,
        chunked=False,
    )
    return validation.result(validation.chunk(frame))


@dataclass
class Streamed:
    """A trigger's candidates now: the counts, and the eligible rows chunk by chunk."""

    found: int
    excluded: dict[str, int]
    chunks: Iterator[pd.DataFrame]


@contextmanager
def stream(
    res: Resources,
    trigger: Trigger,
    params: Mapping[str, Any],
    now: datetime,
    *,
    chunk_size: int = CHUNK_ROWS,
) -> Iterator[Streamed]:
    """Count the candidates, then stream the eligible ones ``chunk_size`` rows at a time.

    The rows are read on their own connection, held open while the caller iterates (one
    consistent snapshot: what the caller writes meanwhile does not change what is read).
    """
    queries = build_queries(trigger, now, params, frequency_cap=res.settings.frequency_cap)
    with res.engine.connect() as conn:
        found, excluded = count(conn, queries)
    with res.engine.connect() as conn, conn.begin():
        yield Streamed(found, excluded, eligible_chunks(conn, queries, chunk_size))
