"""The validation gate: check extracted recipients with Great Expectations, quarantine bad rows.

A trigger declares its checks as data, a :class:`Suite` of :class:`Rule` s. :func:`validate_frame`
runs them as one Great Expectations (GX) 1.x expectation suite over the whole frame and splits it
into the rows that pass every rule (``good``) and one :class:`Violation` per failed (row, rule) for
the ``mf_quarantine`` table. :func:`check_gate` then fails the run only when the share of bad rows
is above the trigger's threshold: a data-quality gate, not a silent drop.

Semantics worth knowing:

- Nulls: every rule except ``not_null`` ignores null values (GX's column map expectations skip
  them), so a NULL email is reported once, by ``not_null``, not again by ``email``. A value rule
  built with ``allow_null=False`` also requires the value (reported as a not-null failure).
- Uniqueness is "one message per recipient per run": rows are compared after the rule's
  normalisation, the first occurrence in frame order (the trigger orders rows by priority) is
  kept and later ones are quarantined. Rows already bad for another rule are never the kept one,
  so a recipient whose top-priority row is broken still gets their next row.
- A run's audience may be validated in chunks (in priority order): GX checks uniqueness within
  each chunk, and a :class:`SeenValues` passed to every call carries the values kept by earlier
  chunks, so a value repeated across chunks is quarantined exactly as within one.

GX is imported and its context built lazily, once per process, on first use: the import alone
takes seconds, and trigger modules import this one just to declare their suites.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from mailflow.addresses import EMAIL_REGEX, email_problem
from mailflow.errors import ConfigError, DataQualityError

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.expectations.expectation import Expectation

__all__ = [
    "EMAIL_REGEX",
    "MAX_FIRST_NAME_CHARS",
    "email_problem",
    "QUARANTINE_TABLE",
    "SUPPORTED_LOCALES",
    "Rule",
    "SeenValues",
    "Suite",
    "ValidationOutcome",
    "Violation",
    "check_gate",
    "recipient_suite",
    "validate_frame",
]

logger = logging.getLogger(__name__)

#: Locales we have templates for; a row with any other locale is quarantined by ``in_set``.
SUPPORTED_LOCALES: tuple[str, ...] = ("en", "de", "fr", "es")

#: A longer first name is quarantined (a data error, not a name); blank ones are fine.
MAX_FIRST_NAME_CHARS = 100

#: Where bad rows end up; named in the gate's error so on-call knows where to look.
QUARANTINE_TABLE = "mf_quarantine"

RuleKind = Literal["not_null", "email", "unique", "length_between", "in_set", "greater_than"]
Normalise = Literal["lower", "strip"]

_NOT_NULL = "expect_column_values_to_not_be_null"
_EXPECTATION_OF: dict[str, str] = {
    "not_null": _NOT_NULL,
    "email": "expect_column_values_to_match_regex",
    "unique": "expect_column_values_to_be_unique",
    "length_between": "expect_column_value_lengths_to_be_between",
    "in_set": "expect_column_values_to_be_in_set",
    "greater_than": "expect_column_values_to_be_between",
}

# Helper columns added to the working copy GX sees; the prefix keeps them clear of real columns.
_ROW = "__mailflow_row"
_NORM = "__mailflow_norm_"

# A reason quotes the bad value; a 5 KB first_name must not become a 5 KB reason.
_MAX_QUOTED = 80


@dataclass(frozen=True)
class Rule:
    """One check on one column, declared as data by a trigger; build it with a constructor.

    ``name`` (``"<column>:<kind>"``) identifies the rule in counts and the quarantine table.
    """

    kind: RuleKind
    column: str
    allow_null: bool = True
    normalise: Normalise | None = None
    keep: Literal["first", "last"] = "first"
    min_length: int | None = None
    max_length: int | None = None
    values: tuple[Any, ...] = ()
    threshold: int | float | Decimal | None = None

    @property
    def name(self) -> str:
        return f"{self.column}:{self.kind}"

    @property
    def expectation(self) -> str:
        """The GX expectation type behind the rule (a null failure reports its own type)."""
        return _EXPECTATION_OF[self.kind]

    @classmethod
    def not_null(cls, column: str) -> Rule:
        return cls("not_null", column, allow_null=False)

    @classmethod
    def email(cls, column: str, *, allow_null: bool = True) -> Rule:
        """A well-formed address per :data:`EMAIL_REGEX`."""
        return cls("email", column, allow_null=allow_null)

    @classmethod
    def unique(
        cls,
        column: str,
        *,
        normalise: Normalise | None = None,
        keep: Literal["first", "last"] = "first",
    ) -> Rule:
        """At most one row per value; the others are quarantined.

        Args:
            normalise: ``"strip"`` compares values with surrounding whitespace removed;
                ``"lower"`` also lower-cases them (as SQL ``lower()`` does), the right choice for
                email addresses. ``None`` compares values exactly.
            keep: which occurrence in frame order is sent, among rows that pass every other rule.
        """
        if normalise not in (None, "lower", "strip"):
            raise ConfigError(
                f"Rule.unique({column!r}): normalise={normalise!r} is not supported; "
                "use None, 'strip' or 'lower'"
            )
        if keep not in ("first", "last"):
            raise ConfigError(
                f"Rule.unique({column!r}): keep={keep!r} is not supported; use 'first' or 'last'"
            )
        return cls("unique", column, normalise=normalise, keep=keep)

    @classmethod
    def length_between(
        cls,
        column: str,
        min_length: int | None = None,
        max_length: int | None = None,
        *,
        allow_null: bool = True,
    ) -> Rule:
        """Text length within ``[min_length, max_length]`` (either bound may be ``None``)."""
        if min_length is None and max_length is None:
            raise ConfigError(
                f"Rule.length_between({column!r}) needs min_length, max_length or both"
            )
        if min_length is not None and max_length is not None and min_length > max_length:
            raise ConfigError(
                f"Rule.length_between({column!r}): min_length {min_length} is above "
                f"max_length {max_length}; swap them"
            )
        return cls(
            "length_between",
            column,
            allow_null=allow_null,
            min_length=min_length,
            max_length=max_length,
        )

    @classmethod
    def in_set(cls, column: str, values: Iterable[Any], *, allow_null: bool = True) -> Rule:
        allowed = tuple(values)
        if not allowed:
            raise ConfigError(f"Rule.in_set({column!r}) needs at least one allowed value")
        return cls("in_set", column, allow_null=allow_null, values=allowed)

    @classmethod
    def greater_than(
        cls, column: str, threshold: int | float | Decimal, *, allow_null: bool = True
    ) -> Rule:
        """Strictly greater than ``threshold``; the column may hold ``Decimal`` s or floats.

        GX stores the threshold as a float; a ``Decimal`` value is compared exactly with it.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, int | float | Decimal):
            raise ConfigError(
                f"Rule.greater_than({column!r}): threshold {threshold!r} is not a number"
            )
        if not math.isfinite(float(threshold)):
            raise ConfigError(
                f"Rule.greater_than({column!r}): threshold {threshold!r} must be finite"
            )
        return cls("greater_than", column, allow_null=allow_null, threshold=threshold)


@dataclass(frozen=True)
class Suite:
    """The named set of rules a trigger's rows must pass."""

    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        # Accept a list from a hand-written trigger, but store a tuple so the suite stays
        # hashable (compiled GX suites are cached by it).
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.name:
            raise ConfigError("Suite.name is empty; name the suite after its trigger")
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ConfigError(
                    f"suite {self.name!r} declares rule {rule.name!r} twice; "
                    "merge the two into one rule"
                )
            seen.add(rule.name)

    @property
    def streamable(self) -> bool:
        """Whether the suite can judge an audience chunk by chunk (see :class:`SeenValues`)."""
        return all(rule.keep == "first" for rule in self.rules if rule.kind == "unique")


def recipient_suite(
    name: str,
    *,
    email_column: str = "email",
    locale_column: str | None = "locale",
    first_name_column: str | None = "first_name",
    extra: Sequence[Rule] = (),
) -> Suite:
    """The standard checks for a row that becomes one email, plus a trigger's ``extra`` rules.

    Present email, well-formed, one message per address (case-insensitive, first row wins),
    a first name of at most 100 characters, and a locale we have templates for. An empty
    first name is not an error: every template has a greeting without a name, and the
    render context turns a blank name into None (``customer_context``).
    """
    rules: list[Rule] = [
        Rule.not_null(email_column),
        Rule.email(email_column),
        Rule.unique(email_column, normalise="lower"),
    ]
    if first_name_column is not None:
        rules.append(Rule.length_between(first_name_column, None, MAX_FIRST_NAME_CHARS))
    if locale_column is not None:
        rules.append(Rule.in_set(locale_column, SUPPORTED_LOCALES))
    rules.extend(extra)
    return Suite(name, tuple(rules))


@dataclass
class Violation:
    """One failed rule on one row: a row of the quarantine table."""

    row_key: str  # value of the key column (the dedupe key) of the bad row; "" when null
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_match_regex"
    column: str
    reason: str  # names the field, the value's problem and the fix
    value: object  # the offending value as extracted (None for null); JSON-friendly scalars
    rule: str  # Rule.name, e.g. "email:email"
    position: int  # 0-based position of the row in the validated frame (df.iloc[position])


@dataclass
class ValidationOutcome:
    good: pd.DataFrame  # rows that passed every rule: original order, columns and index
    violations: list[Violation]  # one per (bad row, failed rule), ordered by row then rule
    bad_rows: int  # distinct bad rows
    total_rows: int
    counts: dict[str, int]  # distinct bad rows per Rule.name; every rule of the suite listed
    suite: str = ""

    @property
    def bad_share(self) -> float:
        return self.bad_rows / self.total_rows if self.total_rows else 0.0


class SeenValues:
    """The values each ``unique`` rule kept in earlier chunks of one audience.

    Per rule, a sorted array of 64-bit hashes of the kept values, and the values with the
    kept rows' keys packed into one byte string: about 16 bytes plus the text per value
    rather than several Python objects, so a million recipients cost tens of megabytes, not
    hundreds. A hash match is confirmed by comparing the values, so a collision never
    quarantines a row.
    """

    def __init__(self) -> None:
        self._rules: dict[int, _KeptValues] = {}

    def find(self, rule_index: int, values: np.ndarray, mask: np.ndarray) -> dict[int, str]:
        """Positions (among ``mask``) whose value an earlier chunk kept → the kept row's key."""
        kept = self._rules.get(rule_index)
        if kept is None:
            return {}
        positions, texts = _present(values, mask)
        return kept.find(positions, texts)

    def add(self, rule_index: int, values: np.ndarray, keys: np.ndarray, mask: np.ndarray) -> None:
        """Remember the values of the rows in ``mask`` (this chunk's good rows)."""
        positions, texts = _present(values, mask)
        if positions.size:
            keep = self._rules.setdefault(rule_index, _KeptValues())
            keep.add(texts, [_key_text(keys[p]) for p in positions.tolist()])


def _present(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Positions in ``mask`` with a non-null value, and those values as text."""
    positions = np.flatnonzero(mask & ~pd.isna(values))
    return positions, [str(v) for v in values[positions].tolist()]


def _hash(texts: list[str]) -> np.ndarray:
    return pd.util.hash_array(np.array(texts, dtype=object)).astype(np.uint64)


def _utf8(text: str) -> bytes:
    # A lone surrogate (hostile input) must round-trip too.
    return text.encode("utf-8", "surrogatepass")


class _KeptValues:
    """One rule's kept values: sorted hashes → entry numbers → (value, key) in one blob."""

    def __init__(self) -> None:
        self._hashes = np.empty(0, dtype=np.uint64)
        self._entries = np.empty(0, dtype=np.int64)
        self._blob = bytearray()
        self._ends = array("q")  # per entry: end of its value, end of its key (8 bytes each)

    def _entry(self, n: int) -> tuple[str, str]:
        start = self._ends[2 * n - 1] if n else 0
        mid, end = self._ends[2 * n], self._ends[2 * n + 1]
        value = self._blob[start:mid].decode("utf-8", "surrogatepass")
        return value, self._blob[mid:end].decode("utf-8", "surrogatepass")

    def find(self, positions: np.ndarray, texts: list[str]) -> dict[int, str]:
        if not texts or not self._hashes.size:
            return {}
        hashes = _hash(texts)
        lo = np.searchsorted(self._hashes, hashes, side="left")
        hi = np.searchsorted(self._hashes, hashes, side="right")
        found: dict[int, str] = {}
        for i in np.flatnonzero(hi > lo).tolist():
            for n in self._entries[lo[i] : hi[i]].tolist():
                value, key = self._entry(n)
                if value == texts[i]:
                    found[int(positions[i])] = key
                    break
        return found

    def add(self, texts: list[str], keys: list[str]) -> None:
        first = len(self._ends) // 2
        for value, key in zip(texts, keys, strict=True):
            self._blob += _utf8(value)
            self._ends.append(len(self._blob))
            self._blob += _utf8(key)
            self._ends.append(len(self._blob))
        hashes = _hash(texts)
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        entries = np.arange(first, first + len(texts), dtype=np.int64)[order]
        at = np.searchsorted(self._hashes, hashes, side="right")
        self._hashes = np.insert(self._hashes, at, hashes)
        self._entries = np.insert(self._entries, at, entries)


def validate_frame(
    df: pd.DataFrame, suite: Suite, *, key_column: str, seen: SeenValues | None = None
) -> ValidationOutcome:
    """Run ``suite`` over ``df`` with GX and split the rows into good ones and violations.

    Args:
        df: one row per planned message, as extracted.
        suite: the trigger's rules.
        key_column: the column holding each row's dedupe key; reported as ``row_key``.
        seen: when ``df`` is one chunk of a larger audience (validated in order), the values
            earlier chunks kept for each ``unique`` rule; updated with this chunk's. A
            ``keep="last"`` rule cannot be judged chunk by chunk (raises ``ConfigError``).

    Raises:
        ConfigError: ``key_column`` or a rule's column is not in the frame.
        DataQualityError: GX could not evaluate a rule at all (for example text in a numeric
            column), so no row can be trusted.
    """
    _check_columns(df, suite, key_column)
    if seen is not None and not suite.streamable:
        raise ConfigError(
            f"suite {suite.name!r} has a unique rule with keep='last', which needs the whole "
            "audience at once; validate it in one frame (seen=None)"
        )
    counts = {rule.name: 0 for rule in suite.rules}
    total = len(df)
    if total == 0 or not suite.rules:
        return ValidationOutcome(df.copy(), [], 0, total, counts, suite.name)

    compiled = _compile(suite)
    work = _working_frame(df, suite, key_column)
    results = _engine().validate(work, compiled.gx_suite, key_column=key_column)

    # Per (rule index, expectation type): row positions that failed, in frame order.
    failed: dict[tuple[int, str], np.ndarray] = {}
    keys_at = work[key_column].to_numpy()
    for spec, result in zip(compiled.specs, results, strict=True):
        positions = _failed_positions(result, suite, spec)
        if positions.size:
            failed[(spec.rule_index, spec.expectation_type)] = positions

    bad = np.zeros(total, dtype=bool)
    unique_specs: list[_Spec] = []
    for spec in compiled.specs:
        if spec.expectation_type == _EXPECTATION_OF["unique"]:
            unique_specs.append(spec)
        elif (found := failed.get((spec.rule_index, spec.expectation_type))) is not None:
            bad[found] = True

    # Uniqueness last and in declaration order: a row already bad is never the kept occurrence.
    # kept_key_of[rule index][position] = the key of the row sent instead of that one.
    kept_key_of: dict[int, dict[int, str]] = {}
    for spec in unique_specs:
        slot = (spec.rule_index, spec.expectation_type)
        normalised = work[_norm_column(spec.rule_index, suite)].to_numpy()
        kept_keys: dict[int, str] = {}
        if seen is not None:
            # Values an earlier chunk already sent: every occurrence here is a duplicate.
            earlier = seen.find(spec.rule_index, normalised, ~bad)
            kept_keys.update(earlier)
            bad[list(earlier)] = True
        dupes = np.array(sorted(kept_keys), dtype=np.int64)
        if (flagged := failed.get(slot)) is not None:
            keep = suite.rules[spec.rule_index].keep
            within, kept = _apply_keep_policy(flagged, bad, normalised, keep=keep)
            kept_keys.update((pos, _key_text(keys_at[k])) for pos, k in kept.items())
            dupes = np.union1d(dupes, within)
            bad[within] = True
        if dupes.size:
            failed[slot] = dupes
        else:
            failed.pop(slot, None)
        kept_key_of[spec.rule_index] = kept_keys
        if seen is not None:
            # The rule's kept rows, as one frame would keep them: a later rule may still
            # quarantine one, and its value stays taken (the same as within a chunk).
            seen.add(spec.rule_index, normalised, keys_at, ~bad)

    violations: list[tuple[int, int, Violation]] = []
    for (rule_index, expectation_type), positions in failed.items():
        rule = suite.rules[rule_index]
        counts[rule.name] += int(np.unique(positions).size)
        values = work[rule.column].to_numpy()
        for pos in positions.tolist():
            value = _plain(values[pos])
            if expectation_type == _NOT_NULL:
                reason = _reason_null(rule)
            elif rule.kind == "unique":
                reason = _reason_duplicate(rule, value, kept_key_of[rule_index][pos])
            else:
                reason = _reason(rule, value)
            violation = Violation(
                row_key=_key_text(keys_at[pos]),
                expectation=expectation_type,
                column=rule.column,
                reason=reason,
                value=value,
                rule=rule.name,
                position=pos,
            )
            violations.append((pos, rule_index, violation))
    violations.sort(key=lambda item: (item[0], item[1]))

    bad_rows = int(bad.sum())
    good = df[~bad] if bad_rows else df.copy()
    if bad_rows:
        logger.info(
            "suite %s: %d of %d rows quarantined (%s)",
            suite.name,
            bad_rows,
            total,
            ", ".join(f"{name} {n}" for name, n in counts.items() if n),
        )
    return ValidationOutcome(
        good=good,
        violations=[v for _, _, v in violations],
        bad_rows=bad_rows,
        total_rows=total,
        counts=counts,
        suite=suite.name,
    )


def check_gate(outcome: ValidationOutcome, *, max_bad_share: float) -> None:
    """Pass when the share of bad rows is at or below ``max_bad_share`` (0.0 to 1.0).

    Raises:
        ConfigError: ``max_bad_share`` is not a number between 0 and 1.
        DataQualityError: too many bad rows; the message gives the share, the threshold, the
            most common problems and where the rows went.
    """
    if isinstance(max_bad_share, bool) or not 0.0 <= max_bad_share <= 1.0:
        raise ConfigError(
            f"max_bad_share {max_bad_share!r} is not a share between 0 and 1; write 5% as 0.05"
        )
    share = outcome.bad_share
    if share <= max_bad_share:
        return
    top = sorted(
        ((n, name) for name, n in outcome.counts.items() if n), key=lambda t: (-t[0], t[1])
    )
    top_text = "; ".join(
        f"{name} {n:,} rows (e.g. {_example_reason(outcome, name)})" for n, name in top[:3]
    )
    suite = f"suite {outcome.suite!r}" if outcome.suite else "validation"
    raise DataQualityError(
        f"{suite} failed the data-quality gate: {outcome.bad_rows:,} of "
        f"{outcome.total_rows:,} rows are bad ({share:.2%}), above max_bad_share "
        f"{max_bad_share:.2%}. Top problems: {top_text}. The run stops before anything is "
        f"sent; the bad rows and their reasons are in the {QUARANTINE_TABLE} table. Fix the "
        "data in the warehouse, or raise the trigger's max_bad_share if this share is "
        "expected, then rerun."
    )


# --- GX, built once per process ------------------------------------------------------------


class _Engine:
    """An ephemeral GX context with one pandas data source, asset and whole-frame batch."""

    def __init__(self) -> None:
        # Respect an explicit choice; otherwise no usage statistics leave this process.
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        gx_logger = logging.getLogger("great_expectations")
        if gx_logger.level == logging.NOTSET:
            # GX logs its own plumbing at INFO (decorator registration, config loading), which
            # would flood a run log configured at INFO. An explicit level set by the app wins.
            gx_logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            # GX 1.24 imports the stdlib modules sre_constants and sre_parse, which Python 3.11
            # deprecates on import. It is GX's import, not our code, and under -W error (as
            # the tests run) the import itself would fail. Scoped to those two messages.
            warnings.filterwarnings(
                "ignore",
                message=r"module 'sre_(constants|parse)' is deprecated",
                category=DeprecationWarning,
            )
            import great_expectations as gx
            from great_expectations.data_context.types.base import (
                DataContextConfig,
                InMemoryStoreBackendDefaults,
                ProgressBarsConfig,
            )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            # GX otherwise draws a tqdm bar on stderr for every validation.
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        context = gx.get_context(mode="ephemeral", project_config=config)
        asset = context.data_sources.add_pandas("mailflow").add_dataframe_asset("recipients")
        self._batch_definition: BatchDefinition = asset.add_batch_definition_whole_dataframe(
            "whole_frame"
        )
        # One validation at a time: GX's pandas engine holds the GIL throughout, so running two
        # at once gains nothing, and the shared context is not documented as thread-safe.
        self._lock = threading.Lock()

    def validate(
        self, work: pd.DataFrame, gx_suite: ExpectationSuite, *, key_column: str
    ) -> list[Any]:
        result_format = {
            "result_format": "COMPLETE",
            # The key for the quarantine table; the row position to map back robustly even
            # when keys repeat or are null.
            "unexpected_index_column_names": [key_column, _ROW],
            # Values are read back from the frame; skip GX's copies and value counts.
            "exclude_unexpected_values": True,
            "partial_unexpected_count": 0,
            "return_unexpected_index_query": False,
        }
        with self._lock:
            batch = self._batch_definition.get_batch(batch_parameters={"dataframe": work})
            outcome = batch.validate(gx_suite, result_format=result_format)
        return list(outcome.results)


_engine_lock = threading.Lock()
_engine_instance: _Engine | None = None


def _engine() -> _Engine:
    global _engine_instance
    with _engine_lock:
        if _engine_instance is None:
            _engine_instance = _Engine()
        return _engine_instance


@dataclass(frozen=True)
class _Spec:
    rule_index: int
    expectation_type: str


@dataclass(frozen=True)
class _Compiled:
    gx_suite: ExpectationSuite
    specs: tuple[_Spec, ...]  # one per expectation, same order as gx_suite.expectations


@lru_cache(maxsize=128)
def _compile(suite: Suite) -> _Compiled:
    """Turn the rules into one GX suite; an expectation two rules imply is run once."""
    _engine()  # imports GX under the warning filter above
    import great_expectations as gx

    expectations: list[Expectation] = []
    specs: list[_Spec] = []
    not_null_columns: set[str] = set()
    # Explicit not_null rules first, so a null is attributed to them rather than to a value
    # rule with allow_null=False on the same column.
    order = sorted(range(len(suite.rules)), key=lambda i: suite.rules[i].kind != "not_null")
    for index in order:
        rule = suite.rules[index]
        if not rule.allow_null and rule.column not in not_null_columns:
            not_null_columns.add(rule.column)
            expectations.append(gx.expectations.ExpectColumnValuesToNotBeNull(column=rule.column))
            specs.append(_Spec(index, _NOT_NULL))
        if rule.kind == "not_null":
            continue
        expectations.append(_expectation_for(rule, index, suite))
        specs.append(_Spec(index, rule.expectation))
    gx_suite = gx.ExpectationSuite(name=suite.name, expectations=expectations)
    return _Compiled(gx_suite, tuple(specs))


def _expectation_for(rule: Rule, index: int, suite: Suite) -> Expectation:
    import great_expectations as gx

    ex = gx.expectations
    if rule.kind == "email":
        return ex.ExpectColumnValuesToMatchRegex(column=rule.column, regex=EMAIL_REGEX)
    if rule.kind == "unique":
        return ex.ExpectColumnValuesToBeUnique(column=_norm_column(index, suite))
    if rule.kind == "length_between":
        return ex.ExpectColumnValueLengthsToBeBetween(
            column=rule.column, min_value=rule.min_length, max_value=rule.max_length
        )
    if rule.kind == "in_set":
        return ex.ExpectColumnValuesToBeInSet(column=rule.column, value_set=list(rule.values))
    if rule.kind == "greater_than":
        assert rule.threshold is not None  # set by the constructor
        return ex.ExpectColumnValuesToBeBetween(
            column=rule.column, min_value=float(rule.threshold), strict_min=True
        )
    raise ConfigError(f"rule {rule.name!r}: unknown kind {rule.kind!r}")


# --- frames ----------------------------------------------------------------------------------


def _check_columns(df: pd.DataFrame, suite: Suite, key_column: str) -> None:
    columns = set(map(str, df.columns))
    if key_column not in columns:
        raise ConfigError(
            f"key_column {key_column!r} is not in the extracted rows (columns: "
            f"{sorted(columns)}); select the dedupe key in the trigger query"
        )
    missing = sorted({r.column for r in suite.rules} - columns)
    if missing:
        raise ConfigError(
            f"suite {suite.name!r} checks {missing}, which the extracted rows do not have "
            f"(columns: {sorted(columns)}); select them in the trigger query or fix the suite"
        )
    clashes = sorted(c for c in columns if c.startswith("__mailflow_"))
    if clashes:
        raise ConfigError(
            f"columns {clashes} use the reserved prefix '__mailflow_'; rename them in the query"
        )


def _norm_column(index: int, suite: Suite) -> str:
    rule = suite.rules[index]
    return rule.column if rule.normalise is None else f"{_NORM}{index}"


def _working_frame(df: pd.DataFrame, suite: Suite, key_column: str) -> pd.DataFrame:
    """The columns GX needs, on a fresh 0..n-1 index, plus row positions and normalised keys."""
    needed = list(dict.fromkeys([key_column, *(r.column for r in suite.rules)]))
    # Copy-on-write (pandas 3) makes this cheap; the caller's frame is never modified.
    work = df[needed].reset_index(drop=True)
    work[_ROW] = np.arange(len(work), dtype=np.int64)
    for index, rule in enumerate(suite.rules):
        if rule.kind == "unique" and rule.normalise is not None:
            text = work[rule.column].astype("string").str.strip()
            work[_norm_column(index, suite)] = (
                text.str.lower() if rule.normalise == "lower" else text
            )
    return work


def _failed_positions(result: Any, suite: Suite, spec: _Spec) -> np.ndarray:
    """Positions of the rows an expectation failed; raises if GX could not evaluate it."""
    rule = suite.rules[spec.rule_index]
    problem = _gx_exception(result.exception_info)
    if problem is None and not result.success:
        positions = _unexpected_rows(result.result.get("unexpected_index_list"))
        if positions:
            return np.asarray(positions, dtype=np.int64)
        # Failed without naming a row: we cannot tell good rows from bad, so trust none.
        problem = "the expectation failed without listing the failing rows"
    if problem is not None:
        raise DataQualityError(
            f"suite {suite.name!r}: rule {rule.name!r} could not be evaluated on column "
            f"{rule.column!r} ({spec.expectation_type}: {problem}); check that the trigger "
            "query returns the type the rule expects (for example numbers, not text)"
        )
    return np.empty(0, dtype=np.int64)


def _gx_exception(info: object) -> str | None:
    """The first error message in a GX result's ``exception_info``, if GX raised one.

    GX reports an error either at the top level (``{"raised_exception": True, ...}``) or, when
    a metric failed, keyed by metric id (``{"<metric id>": {"raised_exception": True, ...}}``).
    """
    if not isinstance(info, Mapping):
        return None
    candidates = [info, *(v for v in info.values() if isinstance(v, Mapping))]
    for entry in candidates:
        if entry.get("raised_exception"):
            message = str(entry.get("exception_message") or "unknown error")
            return message.strip().splitlines()[0] if message.strip() else "unknown error"
    return None


def _unexpected_rows(index_list: object) -> list[int]:
    """Row positions from GX's ``unexpected_index_list``, in either of the shapes GX returns.

    With ``exclude_unexpected_values`` GX 1.24 returns one dict of columns
    (``[{key: [...], row: [...]}]``); without it, one dict per row (``[{key: k, row: r}]``).
    """
    if not isinstance(index_list, list):
        return []  # nothing usable; the caller treats a failure without rows as an error
    rows: list[int] = []
    for item in index_list:
        cell = item.get(_ROW) if isinstance(item, Mapping) else None
        if cell is None:
            continue
        if isinstance(cell, list | tuple | np.ndarray):
            rows.extend(int(r) for r in cell)
        else:
            rows.append(int(cell))
    return sorted(rows)


def _apply_keep_policy(
    flagged: np.ndarray, bad: np.ndarray, normalised: np.ndarray, *, keep: Literal["first", "last"]
) -> tuple[np.ndarray, dict[int, int]]:
    """Split GX's duplicates (every occurrence) into the kept row and the rows to quarantine.

    Returns the positions to quarantine and, for each, the position of the row that is sent.
    """
    eligible = flagged[~bad[flagged]]
    values = pd.Series(normalised[eligible], index=eligible)
    is_dupe = values.duplicated(keep=keep).to_numpy()
    kept_by_value = dict(zip(values[~is_dupe].tolist(), eligible[~is_dupe].tolist(), strict=True))
    dupes = eligible[is_dupe]
    dupe_values = values[is_dupe].tolist()
    kept = {pos: kept_by_value[v] for pos, v in zip(dupes.tolist(), dupe_values, strict=True)}
    return dupes, kept


# --- reasons -------------------------------------------------------------------------------


def _plain(value: object) -> object:
    """A null as None and numpy scalars as Python ones, so a violation serialises as JSON."""
    if value is None or (not isinstance(value, list | tuple | dict) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _key_text(key: object) -> str:
    plain = _plain(key)
    return "" if plain is None else str(plain)


def _quote(value: object) -> str:
    # Numbers as written (0, 12.5), text quoted so blanks and spaces show.
    is_number = isinstance(value, int | float | Decimal) and not isinstance(value, bool)
    text = str(value) if is_number else repr(value)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 4] + "...'"


def _reason_null(rule: Rule) -> str:
    return (
        f"{rule.column} is missing (null); fill it in for this row in the warehouse, or exclude "
        f"rows with a null {rule.column} in the trigger query"
    )


def _reason_duplicate(rule: Rule, value: object, kept_key: str) -> str:
    how = {"lower": " (compared trimmed and lower-cased)", "strip": " (compared trimmed)"}.get(
        rule.normalise or "", ""
    )
    which = "first" if rule.keep == "first" else "last"
    return (
        f"{rule.column} {_quote(value)} repeats row {kept_key!r}{how}; one message per "
        f"recipient per run, so only the {which} valid row is sent; if two rows are unexpected, "
        "dedupe them in the trigger query"
    )


def _reason(rule: Rule, value: object) -> str:
    shown = _quote(value)
    if rule.kind == "email":
        return (
            f"{rule.column} {shown} is not a well-formed address ({email_problem(value)}); "
            "fix the address in the warehouse"
        )
    if rule.kind == "length_between":
        length = len(str(value))
        if rule.min_length is not None and rule.max_length is not None:
            bounds = f"between {rule.min_length} and {rule.max_length}"
        elif rule.min_length is not None:
            bounds = f"at least {rule.min_length}"
        else:
            bounds = f"at most {rule.max_length}"
        return (
            f"{rule.column} {shown} is {length} characters long, not {bounds}; fix the value "
            "in the warehouse"
        )
    if rule.kind == "in_set":
        allowed = ", ".join(map(str, rule.values))
        return (
            f"{rule.column} {shown} is not one of {allowed}; fix the value in the warehouse, "
            "or add it to the suite's allowed values once it is supported"
        )
    if rule.kind == "greater_than":
        return (
            f"{rule.column} {shown} is not greater than {rule.threshold}; fix the value in the "
            f"warehouse, or exclude such rows in the trigger query"
        )
    raise ConfigError(f"rule {rule.name!r}: unknown kind {rule.kind!r}")


def _example_reason(outcome: ValidationOutcome, rule_name: str) -> str:
    for violation in outcome.violations:
        if violation.rule == rule_name:
            return violation.reason
    return "see the quarantine table"
