"""A trigger's audience streamed chunk by chunk: the same outcome as one frame, in bounded
memory, and nothing sendable before the data-quality gate has judged every chunk.

Validation is compared with the one-frame path on generated audiences (GX runs for real);
the planning tests use a real warehouse (SQLite, and PostgreSQL when available).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from mailflow import ledger, validation
from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.pipeline import resources
from mailflow.pipeline.plan import prepare
from mailflow.triggers import get_trigger
from mailflow.validation import Rule, SeenValues, Suite, validate_frame
from mailflow.warehouse.schema import quarantine, send_ledger
from tests.shop import Shopper, build_shop

CART = get_trigger("abandoned_cart")
PARAMS = CART.params({})

# A second unique rule (on the customer) shows rules interacting across chunks.
TWO_UNIQUE = Suite(
    "two_unique",
    (*CART.suite.rules, Rule.unique("customer_id")),
)

_EMAILS = ["ann@example.com", " Ann@Example.com", "bob@example.com", "BOB@example.com ", "x@y.io"]
_BAD_EMAILS = ["not-an-address", "a@@b.com"]


def _audience(draw: Any) -> pd.DataFrame:
    n = draw(st.integers(min_value=0, max_value=60))
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32)))
    rows = []
    for i in range(n):
        roll = rng.random()
        email = (
            None
            if roll < 0.05
            else rng.choice(_BAD_EMAILS)
            if roll < 0.15
            else rng.choice(_EMAILS)
            if roll < 0.6
            else f"user{rng.randrange(40)}@example.com"
        )
        rows.append(
            {
                "dedupe_key": f"cart:{i}",
                "customer_id": rng.randrange(30),
                "email": email,
                "first_name": rng.choice(["Ann", "", None, "x" * 101]),
                "locale": rng.choice(["en", "de", "xx"]),
                "cart_total": rng.choice([10.0, 0.0, 99.5]),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["dedupe_key", "customer_id", "email", "first_name", "locale", "cart_total"],
    )


def _seen_as(outcome: Any) -> tuple[list[str], Counter[tuple[str, str, str]], dict[str, int]]:
    good = outcome.good["dedupe_key"].tolist()
    violations = Counter((v.row_key, v.rule, v.reason) for v in outcome.violations)
    return good, violations, outcome.counts


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_chunked_validation_equals_one_frame(data: Any) -> None:
    frame = _audience(data.draw)
    suite = data.draw(st.sampled_from([CART.suite, TWO_UNIQUE]))
    whole = validate_frame(frame, suite, key_column="dedupe_key")

    cuts = sorted(data.draw(st.lists(st.integers(0, len(frame)), max_size=6)))
    bounds = [0, *cuts, len(frame)]
    seen = SeenValues()
    goods, violations, counts = [], Counter(), Counter()
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            part = validate_frame(frame.iloc[lo:hi], suite, key_column="dedupe_key", seen=seen)
        g, v, c = _seen_as(part)
        goods += g
        violations += v
        counts.update(c)

    expected_good, expected_violations, expected_counts = _seen_as(whole)
    assert goods == expected_good
    assert violations == expected_violations
    assert {k: counts[k] for k in expected_counts} == expected_counts


def test_a_repeat_in_a_later_chunk_names_the_row_that_was_sent() -> None:
    first = pd.DataFrame(
        {
            "dedupe_key": ["cart:1"],
            "customer_id": [1],
            "email": ["Ann@Example.com"],
            "first_name": ["Ann"],
            "locale": ["en"],
            "cart_total": [5.0],
        }
    )
    later = first.assign(dedupe_key=["cart:2"], email=["ANN@example.COM"])
    seen = SeenValues()
    assert validate_frame(first, CART.suite, key_column="dedupe_key", seen=seen).bad_rows == 0
    outcome = validate_frame(later, CART.suite, key_column="dedupe_key", seen=seen)
    (violation,) = outcome.violations
    assert violation.rule == "email:unique" and violation.row_key == "cart:2"
    assert "repeats row 'cart:1'" in violation.reason


def test_seen_values_tell_apart_values_whose_hashes_collide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every value hashes alike: only the stored values can tell them apart.
    monkeypatch.setattr(validation, "_hash", lambda texts: np.zeros(len(texts), dtype=np.uint64))
    seen = SeenValues()
    seen.add(0, np.array(["a@example.com"], dtype=object), np.array(["k1"]), np.array([True]))
    probe = np.array(["b@example.com", "a@example.com"], dtype=object)
    assert seen.find(0, probe, np.array([True, True])) == {1: "k1"}


def test_a_keep_last_rule_cannot_be_judged_chunk_by_chunk() -> None:
    suite = Suite("last", (Rule.unique("email", keep="last"),))
    assert not suite.streamable
    frame = pd.DataFrame({"dedupe_key": ["k"], "email": ["a@b.co"]})
    with pytest.raises(ConfigError, match="keep='last'"):
        validate_frame(frame, suite, key_column="dedupe_key", seen=SeenValues())


# --- planning a streamed audience ------------------------------------------------------------


def _shop(res: resources.Resources, good: int, bad: int = 0, repeats: int = 0) -> None:
    shoppers = [Shopper(email=f"user{i}@example.com") for i in range(good)]
    shoppers += [Shopper(email=f"broken{i}.example.com") for i in range(bad)]
    # The same inbox on other customers' carts, idle longer: later in priority order.
    shoppers += [Shopper(email=f"USER{i}@example.com", idle_hours=30.0) for i in range(repeats)]
    build_shop(res.engine, shoppers)


def _statuses(res: resources.Resources) -> dict[str, int]:
    with res.engine.connect() as conn:
        rows = conn.execute(select(send_ledger.c.status, func.count()).group_by("status"))
        return {status: n for status, n in rows}


def test_a_streamed_run_plans_and_quarantines_as_one_frame_would(env: Any) -> None:
    res = resources.current()
    _shop(res, good=23, bad=4, repeats=5)
    prepared = prepare(
        res,
        CART,
        PARAMS,
        utcnow(),
        flow_run_id="r1",
        max_bad_share=0.5,
        batch_size=10,
        chunk_size=4,
    )
    assert prepared.found == 32 and prepared.excluded == {}
    assert prepared.validated.quarantined == {"email:email": 4, "email:unique": 5}
    assert prepared.plan is not None and prepared.plan.planned == 23
    assert [len(b) for b in prepared.plan.batches] == [10, 10, 3]
    assert _statuses(res) == {"planned": 23}
    with res.engine.connect() as conn:
        reasons = (
            conn.execute(
                select(quarantine.c.reason).where(quarantine.c.expectation.like("%unique%"))
            )
            .scalars()
            .all()
        )
    # Each repeat is in a later chunk than the row that is sent, and names it.
    assert len(reasons) == 5 and all("repeats row 'abandoned_cart:" in r for r in reasons)


def test_nothing_is_sendable_until_the_gate_passes_and_a_failed_gate_plans_nothing(
    env: Any,
) -> None:
    res = resources.current()
    _shop(res, good=6, bad=6)
    seen_statuses: list[dict[str, int]] = []
    original = ledger.promote_held

    def watch(conn: Any, trigger: str, flow_run_id: str | None) -> int:
        seen_statuses.append(dict(Counter(conn.execute(select(send_ledger.c.status)).scalars())))
        return original(conn, trigger, flow_run_id)

    ledger.promote_held = watch  # type: ignore[assignment]
    try:
        failed = prepare(
            res,
            CART,
            PARAMS,
            utcnow(),
            flow_run_id="r1",
            max_bad_share=0.1,
            batch_size=10,
            chunk_size=3,
        )
        assert failed.plan is None and "max_bad_share" in str(failed.validated.gate_error)
        # The good rows were held while the chunks went by, then withdrawn: none is left.
        assert _statuses(res) == {}
        with res.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(quarantine)).scalar_one() == 6

        # The next run judges only new bad rows: the gate passes, the six are planned.
        passed = prepare(
            res,
            CART,
            PARAMS,
            utcnow(),
            flow_run_id="r2",
            max_bad_share=0.1,
            batch_size=10,
            chunk_size=3,
        )
    finally:
        ledger.promote_held = original  # type: ignore[assignment]
    assert passed.plan is not None and passed.plan.planned == 6
    assert passed.validated.still_quarantined == 6
    # Right before the gate's verdict, every row of the run was held, none sendable.
    assert seen_statuses == [{"held": 6}]
    assert _statuses(res) == {"planned": 6}


def test_held_rows_a_stopped_run_left_are_extracted_again_and_planned_once(env: Any) -> None:
    res = resources.current()
    _shop(res, good=5)
    first = prepare(res, CART, PARAMS, utcnow(), flow_run_id="r1", max_bad_share=0.1, batch_size=10)
    assert first.plan is not None and first.plan.planned == 5
    # As if the run had stopped between chunks and gate: its rows are still held. No
    # sending run may take them (they are not planned) ...
    with res.engine.begin() as conn:
        conn.execute(update(send_ledger).values(status=ledger.Status.HELD))
        assert ledger.planned_ids(conn, CART.name) == []
    # ... a new run leaves a recent hold of another run alone (it may still be running) ...
    other = prepare(res, CART, PARAMS, utcnow(), flow_run_id="r2", max_bad_share=0.1, batch_size=10)
    assert other.plan is not None and other.plan.planned == 0
    assert other.excluded == {"already_notified": 5}
    # ... and clears it once it is older than the lease; a Prefect retry of the same run
    # (same id) clears its own at once.
    with res.engine.begin() as conn:
        conn.execute(
            update(send_ledger).values(updated_at=utcnow() - ledger.LEASE - timedelta(minutes=1))
        )
    later = prepare(res, CART, PARAMS, utcnow(), flow_run_id="r3", max_bad_share=0.1, batch_size=10)
    assert later.plan is not None and later.plan.planned == 5
    assert _statuses(res) == {"planned": 5}
    with res.engine.begin() as conn:
        conn.execute(update(send_ledger).values(status=ledger.Status.HELD))
    retried = prepare(
        res, CART, PARAMS, utcnow(), flow_run_id="r3", max_bad_share=0.1, batch_size=10
    )
    assert retried.plan is not None and retried.plan.planned == 5
    with res.engine.connect() as conn:
        keys = conn.execute(select(send_ledger.c.dedupe_key)).scalars().all()
    assert len(keys) == len(set(keys)) == 5
