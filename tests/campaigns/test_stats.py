"""Experiment statistics against values worked out by hand, and read from the warehouse."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, insert, select

from mailflow.campaigns.stats import (
    CONVERSION_WINDOW,
    compare,
    compute_results,
    configured_split,
    experiment_table,
    proportion,
    render_table,
    sample_ratio_mismatch,
    verdict,
)
from mailflow.clock import utcnow
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import (
    campaign_assignments,
    campaign_results,
    events,
    send_ledger,
)
from tests.campaigns.shop import Person, add_order, add_people

Z95 = 1.959963984540054


def wilson(x: int, n: int) -> tuple[float, float]:
    p = x / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula() -> None:
    p = proportion(30, 100)
    low, high = wilson(30, 100)
    assert p.rate == 0.3
    assert p.ci_low == pytest.approx(low, abs=1e-9) and p.ci_high == pytest.approx(high, abs=1e-9)
    assert p.ci_low == pytest.approx(0.2189, abs=1e-4) and p.ci_high == pytest.approx(
        0.3958, abs=1e-4
    )
    assert proportion(0, 0).rate is None


def test_two_proportion_z_test_matches_the_textbook_value() -> None:
    # 30/100 against 20/100: pooled p 0.25, z = 0.1 / sqrt(0.25 * 0.75 * 0.02) = 1.633.
    c = compare(30, 100, 20, 100)
    z = 0.1 / math.sqrt(0.25 * 0.75 * 0.02)
    assert c.diff == pytest.approx(0.1)
    assert c.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), abs=1e-12)
    assert c.p_value == pytest.approx(0.1025, abs=1e-4)
    assert c.ci_low is not None and c.ci_high is not None and c.ci_low < 0.1 < c.ci_high
    assert compare(0, 50, 0, 50).p_value == 1.0  # no variance: no evidence of a difference


def test_results_per_arm_from_recipient_rows() -> None:
    import pandas as pd

    now = pd.Timestamp("2025-01-01 10:00")
    rows = []
    for arm, n, sent, opened, clicked, converted in (
        ("control", 100, 100, 40, 10, 8),
        ("b", 100, 100, 50, 20, 12),
        ("holdout", 100, 0, 0, 0, 4),
    ):
        for i in range(n):
            rows.append(
                {
                    "arm": arm,
                    "sent": i < sent,
                    "delivered": i < sent,
                    "opened": i < opened,
                    "clicked": i < clicked,
                    "converted": i < converted,
                    "start": now,
                }
            )
    out = {
        (r["arm"], r["metric"]): r
        for r in compute_results(pd.DataFrame(rows), campaign="x", variants=["control", "b"])
    }
    assert out[("b", "open")]["rate"] == 0.5
    assert out[("b", "open")]["diff_vs_control"] == pytest.approx(0.1)
    assert out[("b", "open")]["p_value_vs_control"] == pytest.approx(
        compare(50, 100, 40, 100).p_value
    )
    # 50 % vs 40 % of 100: p = 0.157, so no winner is named.
    assert out[("b", "open")]["verdict_vs_control"] == "not significant"
    assert out[("b", "click_to_open")]["rate"] == pytest.approx(20 / 50)
    assert out[("control", "itt_conversion")]["lift_vs_holdout"] == pytest.approx(1.0)  # 8 vs 4 %
    assert out[("all_variants", "itt_conversion")]["numerator"] == 20
    assert out[("all_variants", "itt_conversion")]["lift_vs_holdout"] == pytest.approx(1.5)
    assert out[("all_variants", "itt_conversion")]["verdict_vs_holdout"] == "not significant"
    assert ("holdout", "open") not in out and out[("holdout", "itt_conversion")]["rate"] == 0.04
    assert not any(r["metric"] == "conversion" for r in out.values())  # no unlabelled one


def experiment(engine: Engine) -> tuple[list[int], datetime]:
    """Campaign ``exp``: two control, two ``b``, two holdout; sends an hour after t0."""
    ids = add_people(engine, [Person(f"c{i}@example.com") for i in range(6)])
    t0 = utcnow() - timedelta(days=5)
    arms = {ids[0]: "control", ids[1]: "control", ids[2]: "b", ids[3]: "b",
            ids[4]: "holdout", ids[5]: "holdout"}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            insert(campaign_assignments),
            [
                {"campaign": "exp", "customer_id": c, "arm": a, "assigned_at": t0}
                for c, a in arms.items()
            ],
        )
        ledger_ids = {}
        for cid, arm in arms.items():
            if arm == "holdout":
                continue
            ledger_ids[cid] = conn.execute(
                insert(send_ledger)
                .values(dedupe_key=f"campaign:exp:{cid}", trigger="campaign:exp", customer_id=cid,
                        email=f"x{cid}@example.com", variant=arm, status="sent", context={},
                        created_at=t0, updated_at=t0, sent_at=t0 + timedelta(hours=1))
                .returning(send_ledger.c.id)
            ).scalar_one()  # fmt: skip
        happened = [(ids[0], "open"), (ids[0], "open"), (ids[2], "click"), (ids[1], "machine")]
        happened += [(cid, "delivered") for cid in ledger_ids]
        for n, (cid, event) in enumerate(happened):
            conn.execute(
                insert(events).values(natural_key=f"n{n}", event=event.replace("machine", "open"),
                                      machine_open=event == "machine", occurred_at=t0,
                                      ledger_id=ledger_ids[cid], raw={}, received_at=t0)
            )  # fmt: skip
    return ids, t0


def test_experiment_table_reads_ledger_events_and_orders(env) -> None:  # type: ignore[no-untyped-def]
    engine = get_engine()
    ids, t0 = experiment(engine)
    add_order(engine, ids[0], t0 + timedelta(hours=10))  # control: converts
    add_order(engine, ids[1], t0 - timedelta(hours=1))  # before the send: does not count
    add_order(engine, ids[2], t0 + timedelta(hours=80))  # after 72 h: does not count
    add_order(engine, ids[4], t0 + timedelta(hours=2))  # holdout: from assignment time

    rows = experiment_table(engine, "exp", variants=["control", "b"])
    got = {(r["arm"], r["metric"]): (r["numerator"], r["denominator"]) for r in rows}
    assert got[("control", "open")] == (1, 2)  # the machine open is not an open
    assert got[("b", "open")] == (1, 2)  # a click counts as an open
    assert got[("b", "click")] == (1, 2)
    assert got[("b", "click_to_open")] == (1, 1)
    assert got[("control", "itt_conversion")] == (1, 2)
    assert got[("b", "itt_conversion")] == (0, 2)
    assert got[("holdout", "itt_conversion")] == (1, 2)
    assert got[("all_variants", "sent")] == (4, 4)
    assert got[("all_variants", "delivered")] == (4, 4)
    with engine.connect() as conn:
        assert len(conn.execute(select(campaign_results)).all()) == len(rows)
    assert render_table(rows).row_count == len(rows)


def test_conversions_use_the_rollups_definition(env) -> None:  # type: ignore[no-untyped-def]
    engine = get_engine()
    ids, t0 = experiment(engine)
    # Refunded (or cancelled) orders never convert, as in the rollup.
    add_order(engine, ids[1], t0 + timedelta(hours=5), status="refunded")
    add_order(engine, ids[0], t0 + timedelta(hours=5), status="cancelled")
    # The window's last instant counts: "at most 72 hours" after the send.
    add_order(engine, ids[3], t0 + timedelta(hours=1) + CONVERSION_WINDOW)
    # The holdout's window starts at its assignment; one instant later is inside it.
    add_order(engine, ids[5], t0 + CONVERSION_WINDOW + timedelta(microseconds=1))

    got = {
        (r["arm"], r["metric"]): (r["numerator"], r["denominator"])
        for r in experiment_table(engine, "exp", variants=["control", "b"])
    }
    assert got[("control", "itt_conversion")] == (0, 2)
    assert got[("b", "itt_conversion")] == (1, 2)
    assert got[("holdout", "itt_conversion")] == (0, 2)


def test_verdicts_name_no_winner_without_significance() -> None:
    assert verdict(compare(30, 100, 20, 100)) == "not significant"  # p = 0.10
    assert verdict(compare(300, 1000, 200, 1000)) == "higher"  # p < 1e-6
    assert verdict(compare(200, 1000, 300, 1000)) == "lower"
    assert verdict(compare(0, 50, 0, 50)) == "not significant"
    assert verdict(compare(1, 0, 1, 10)) is None


def test_the_configured_split_includes_the_holdout() -> None:
    split = configured_split([("control", 0.5), ("b", 0.5)], 0.2)
    assert split == pytest.approx({"control": 0.4, "b": 0.4, "holdout": 0.2}, abs=1e-12)
    assert configured_split([("a", 0.7), ("b", 0.3)], 0.0) == pytest.approx({"a": 0.7, "b": 0.3})


@pytest.mark.parametrize(
    "assigned",
    [
        {"control": 400, "b": 400, "holdout": 200},  # exactly as configured
        {"control": 410, "b": 385, "holdout": 205},  # chance
        {"control": 480, "b": 330, "holdout": 190},  # broken assignment
        {"control": 1, "b": 0, "holdout": 0},
    ],
)
def test_sample_ratio_mismatch_matches_scipy_and_the_formula(assigned: dict[str, int]) -> None:
    from scipy.stats import chi2 as chi2_dist
    from scipy.stats import chisquare

    configured = {"control": 0.4, "b": 0.4, "holdout": 0.2}
    check = sample_ratio_mismatch("x", assigned, configured)
    n = sum(assigned.values())
    observed = [assigned[a] for a in configured]
    expected = [n * configured[a] for a in configured]
    by_hand = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    stat, p = chisquare(observed, expected)
    assert check.chi2 == pytest.approx(by_hand, abs=1e-9) and check.chi2 == pytest.approx(stat)
    assert check.p_value == pytest.approx(float(p), abs=1e-9)
    assert check.p_value == pytest.approx(float(chi2_dist.sf(by_hand, 2)), abs=1e-9)
    assert check.mismatch == (float(p) < 0.001)
    rows = {r["arm"]: r for r in check.rows()}
    assert rows["holdout"]["configured_share"] == 0.2
    assert rows["holdout"]["observed_share"] == pytest.approx(assigned["holdout"] / n)
    assert rows["holdout"]["expected"] == pytest.approx(0.2 * n)
    assert ("MISMATCH" in check.summary()) == check.mismatch


def test_the_split_check_flags_a_mismatch_and_an_unconfigured_arm() -> None:
    broken = sample_ratio_mismatch("x", {"a": 480, "b": 330}, {"a": 0.5, "b": 0.5})
    assert broken.mismatch and broken.p_value is not None and broken.p_value < 1e-6
    stray = sample_ratio_mismatch("x", {"a": 50, "b": 50, "holdout": 3}, {"a": 0.5, "b": 0.5})
    assert stray.mismatch and stray.p_value == 0.0
    assert sample_ratio_mismatch("x", {}, {"a": 0.5, "b": 0.5}).p_value is None
    fine = sample_ratio_mismatch("x", {"a": 500, "b": 500}, {"a": 0.5, "b": 0.5})
    assert not fine.mismatch and fine.p_value == pytest.approx(1.0)


def test_the_campaign_open_rate_is_the_rollups(env) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from mailflow.metrics import rollup

    engine = get_engine()
    experiment(engine)
    rollup(engine)
    got = {
        (r["arm"], r["metric"]): r["rate"]
        for r in experiment_table(engine, "exp", variants=["control", "b"])
    }
    with engine.connect() as conn:
        totals = {
            r.variant: r
            for r in conn.execute(
                text(
                    "SELECT variant, open_rate, click_rate, delivery_rate FROM "
                    "mf_engagement_totals WHERE trigger = 'campaign:exp'"
                )
            )
        }
    for arm in ("control", "b"):
        assert got[(arm, "open")] == pytest.approx(totals[arm].open_rate, abs=1e-12)
        assert got[(arm, "click")] == pytest.approx(totals[arm].click_rate, abs=1e-12)
        assert got[(arm, "delivered")] == pytest.approx(totals[arm].delivery_rate, abs=1e-12)


@pytest.mark.parametrize(("x_a", "n_a", "x_b", "n_b"), [(30, 100, 20, 100), (7, 40, 15, 60)])
def test_the_newcombe_interval_matches_the_formula(x_a: int, n_a: int, x_b: int, n_b: int) -> None:
    # Newcombe's hybrid score interval (method 10) from the two Wilson intervals.
    p_a, p_b = x_a / n_a, x_b / n_b
    (l_a, u_a), (l_b, u_b) = wilson(x_a, n_a), wilson(x_b, n_b)
    d = p_a - p_b
    low = d - math.sqrt((p_a - l_a) ** 2 + (u_b - p_b) ** 2)
    high = d + math.sqrt((u_a - p_a) ** 2 + (p_b - l_b) ** 2)
    c = compare(x_a, n_a, x_b, n_b)
    assert c.ci_low == pytest.approx(low, abs=1e-9) and c.ci_high == pytest.approx(high, abs=1e-9)
