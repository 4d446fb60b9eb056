"""The metrics contract v2 (docs/metrics.md): migration 0013, machine opens from the
event's flag, and the views' rates against the report's one list of definitions."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, select, text

from mailflow.metrics import rollup
from mailflow.report import RATES, with_rates
from mailflow.warehouse.migrate import alembic_config, upgrade
from mailflow.warehouse.schema import events
from mailflow.webhook.ingest import machine_open, normalise, store_events
from tests.mailflow.test_metrics import build_world

NOW = datetime(2026, 12, 1, 12, 0)


@pytest.mark.parametrize(
    ("flag", "expected"),
    [(True, True), (False, False), ("true", True), ("1", True), (1, True), (None, False)],
)
def test_the_machine_open_flag_is_read_from_the_event(flag: object, expected: bool) -> None:
    raw = {"event": "open", "timestamp": 1_790_000_000, "sg_machine_open": flag}
    assert machine_open(raw) is expected
    assert normalise(raw, NOW)["machine_open"] is expected
    # Only an open is a machine open.
    assert normalise({**raw, "event": "click"}, NOW)["machine_open"] is False


def test_migration_0013_flags_stored_machine_opens_and_goes_back(
    warehouse_url: str, engine: Engine
) -> None:
    cfg = alembic_config(warehouse_url)
    command.downgrade(cfg, "0012")
    with engine.begin() as conn:
        columns = [r[0] for r in conn.execute(text("SELECT * FROM mf_events")).cursor.description]
        assert "machine_open" not in columns
        for n, flag in enumerate((True, False, None)):
            raw = '{"sg_machine_open": %s}' % ("null" if flag is None else str(flag).lower())
            conn.execute(
                text(
                    "INSERT INTO mf_events (natural_key, event, occurred_at, raw, received_at) "
                    "VALUES (:k, 'open', :at, :raw, :at)"
                ),
                {"k": f"k{n}", "at": NOW, "raw": raw},
            )
        # A v1 result row: an unlabelled "conversion", gone after the upgrade.
        conn.execute(
            text(
                "INSERT INTO mf_campaign_results (campaign, arm, metric, numerator, "
                "denominator, computed_at) VALUES ('c', 'a', 'conversion', 1, 2, :at)"
            ),
            {"at": NOW},
        )
    upgrade(warehouse_url)
    with engine.connect() as conn:
        flags = dict(conn.execute(select(events.c.natural_key, events.c.machine_open)).all())
        assert flags == {"k0": True, "k1": False, "k2": False}
        assert conn.execute(text("SELECT COUNT(*) FROM mf_campaign_results")).scalar_one() == 0
        # The v2 views answer.
        conn.execute(text("SELECT machine_open_rate, p90_seconds_to_open FROM mf_engagement_daily"))


def test_the_views_rates_are_the_reports_definitions(engine: Engine) -> None:
    build_world(engine)
    rollup(engine)
    names = [name for name, _, _ in RATES]
    with engine.connect() as conn:
        daily = conn.execute(text("SELECT * FROM mf_engagement_daily")).mappings().all()
        totals = conn.execute(text("SELECT * FROM mf_engagement_totals")).mappings().all()
    assert daily and totals
    for row in (*daily, *totals):
        expected = with_rates(row)
        for name in names:
            if expected[name] is None:
                assert row[name] is None, name
            else:
                assert row[name] == pytest.approx(expected[name], abs=1e-12), name
    # Every rate of the contract is in the views, and nothing unlabelled is.
    assert set(names) <= set(daily[0]) and "conversion_rate" not in daily[0]
    assert "conversions" not in daily[0] and "conversions_last_touch" in daily[0]


def test_a_click_without_an_open_counts_as_opened_and_proves_delivery(engine: Engine) -> None:
    w = build_world(engine, seed=11)
    lonely = next(iter(w.messages))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM mf_events WHERE ledger_id = :i"), {"i": lonely})
        at = w.messages[lonely]["sent_at"] + timedelta(minutes=5)
        store_events(conn, [w._event(lonely, "click", at, url="https://x")])
    rollup(engine)
    with engine.connect() as conn:
        fact = conn.execute(
            text("SELECT delivered_at, opens, clicks FROM mf_message_facts WHERE ledger_id = :i"),
            {"i": lonely},
        ).one()
        assert fact.delivered_at is not None and (fact.opens, fact.clicks) == (0, 1)
        for r in conn.execute(text("SELECT * FROM mf_engagement_daily")).mappings():
            assert r["unique_clicks"] <= r["unique_opens"] <= r["delivered"] <= r["sent"]
            assert r["click_to_open_rate"] is None or r["click_to_open_rate"] <= 1


def test_the_funnel_chart_and_the_table_agree_on_every_percentage(
    engine: Engine, tmp_path: Path
) -> None:
    from mailflow.report import (
        FUNNEL,
        Period,
        denominator,
        funnel_chart,
        funnel_labels,
        funnel_rows,
        line_label,
        metrics_tables,
        period_metrics,
    )

    build_world(engine)
    rollup(engine)
    rows = period_metrics(engine, Period(date(2000, 1, 1), date(2100, 1, 1)))
    per_trigger = funnel_rows(rows)
    for table in metrics_tables(rows):
        trigger = str(table.title)
        labels = list(table.columns[0]._cells)
        total = list(table.columns[-1]._cells)  # the "all" column: every variant
        chart = funnel_labels(per_trigger[trigger])
        for (label, _, rate), on_chart in zip(FUNNEL, chart, strict=True):
            cell = total[labels.index(line_label(label, rate))]
            # The same count and percentage; the chart says the denominator in the
            # label, the table in the line's name.
            if rate is None:
                assert on_chart == cell
            else:
                assert on_chart == f"{cell[:-1]} of {denominator(rate)})"
                assert f"(% of {denominator(rate)})" in line_label(label, rate)
        assert "%" not in chart[0] and "% of delivered)" in chart[2]
    png = funnel_chart(rows, tmp_path / "funnel.png", title="t")
    assert png.stat().st_size > 1000
