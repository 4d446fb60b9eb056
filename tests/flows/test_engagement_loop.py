"""The whole loop: send → signed events → webhook → warehouse → rollup → report.

The abandoned-cart flow sends through the local SendGrid API, which posts signed
events to the real webhook; the engagement-rollup flow (Prefect's harness) then
builds the metric tables, which must agree with the events the warehouse holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from typer.testing import CliRunner

from flows.abandoned_cart import abandoned_cart
from flows.engagement_rollup import engagement_rollup
from mailflow import cli
from mailflow.cli import app
from mailflow.clock import utcnow
from mailflow.report import COUNTS
from mailflow.settings import get_settings
from mailflow.sink.testing import SinkHandle
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import events, metrics_daily, orders, send_ledger, suppressions
from tests.events import hooked_sink, wait_for_events
from tests.shop import Shopper, build_shop

pytestmark = pytest.mark.usefixtures("prefect_harness")

SPECIAL = ("bounce1", "spam1", "unsub1", "open1", "open2")


@pytest.fixture
def sink(warehouse_url: str) -> Iterator[SinkHandle]:
    """The local SendGrid API posting signed events to the real webhook (overrides conftest's).

    Only the fixed outcomes (bounce1, spam1, unsub1) bounce, complain or unsubscribe, so
    the suppressions below are exact; opens and clicks are drawn."""
    quiet = {"bounce_rate": 0.0, "spam_rate": 0.0, "unsubscribe_rate": 0.0}
    with hooked_sink(
        warehouse_url, events_seed=3, open_rate=0.5, click_rate=0.5, **quiet
    ) as handle:
        yield handle


def daily_totals() -> dict[str, Any]:
    with get_engine().connect() as conn:
        row = conn.execute(
            select(*(func.sum(metrics_daily.c[c]).label(c) for c in COUNTS + ("revenue",)))
        ).one()
    return dict(row._mapping)


def distinct_messages_with(event: str, **where: Any) -> int:
    conds = [events.c.event == event, events.c.ledger_id.is_not(None)]
    conds += [events.c[k] == v for k, v in where.items()]
    with get_engine().connect() as conn:
        return int(
            conn.execute(
                select(func.count(events.c.ledger_id.distinct())).where(*conds)
            ).scalar_one()
        )


def test_events_become_suppressions_metrics_and_a_report(
    env: pytest.MonkeyPatch, sink: SinkHandle, tmp_path: Path
) -> None:
    people = [Shopper(email=f"{name}@example.com") for name in SPECIAL]
    people += [Shopper(email=f"user{i}@example.com") for i in range(25)]
    build_shop(get_engine(), people)

    summary = abandoned_cart(batch_size=10)
    assert summary.sent == len(people)
    wait_for_events(sink)

    # Suppressions from the bounce, the complaint and the unsubscribe.
    with get_engine().connect() as conn:
        suppressed = dict(conn.execute(select(suppressions.c.email, suppressions.c.reason)).all())
    assert suppressed == {
        "bounce1@example.com": "bounce",
        "spam1@example.com": "spamreport",
        "unsub1@example.com": "unsubscribe",
    }

    result = engagement_rollup()
    assert result["full"] and result["messages"] == len(people)
    totals = daily_totals()
    assert totals["sent"] == len(people)
    assert totals["delivered"] == distinct_messages_with("delivered")
    assert totals["bounced"] == 1 and totals["spam_reports"] == 1 and totals["unsubscribes"] == 1
    # Human opens (a click implies one) and machine opens apart.
    with get_engine().connect() as conn:
        human = (events.c.event == "click") | ((events.c.event == "open") & ~events.c.machine_open)
        opened = conn.execute(
            select(func.count(events.c.ledger_id.distinct())).where(human)
        ).scalar_one()
    assert totals["unique_opens"] == opened >= 2
    assert totals["unique_machine_opens"] == distinct_messages_with("open", machine_open=True)
    assert totals["unique_clicks"] == distinct_messages_with("click")
    assert totals["conversions_last_touch"] == 0
    assert result["metrics"][0]["trigger"] == "abandoned_cart"

    # A reminded shopper buys: the next (incremental) run counts the conversion.
    with get_engine().begin() as conn:
        buyer = conn.execute(
            select(send_ledger.c.customer_id).where(send_ledger.c.email == "open1@example.com")
        ).scalar_one()
        now = utcnow()
        conn.execute(
            insert(orders).values(
                customer_id=buyer,
                status="placed",
                total=Decimal("42.50"),
                created_at=now,
                updated_at=now,
            )
        )
    again = engagement_rollup()
    assert not again["full"]
    totals = daily_totals()
    assert totals["conversions_last_touch"] == 1 and Decimal(totals["revenue"]) == Decimal("42.50")
    with get_engine().connect() as conn:
        rate = conn.execute(
            text(
                "SELECT conversion_rate_last_touch FROM mf_engagement_totals "
                "WHERE trigger = 'abandoned_cart'"
            )
        ).scalar_one()
    assert rate == pytest.approx(1 / totals["sent"])

    # The report: a table on stdout and a PNG funnel chart.
    chart = tmp_path / "funnel.png"
    env.setattr(cli.console, "width", 200)  # the whole table, not an 80-column squeeze
    out = CliRunner().invoke(app, ["report", "--days", "2", "--chart", str(chart)])
    assert out.exit_code == 0, out.output
    assert "abandoned_cart" in out.output and "42.50" in out.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5_000

    # Forget the sends (so "already notified" does not hide the rest): the next run
    # excludes the suppressed addresses, counted by reason.
    with get_engine().begin() as conn:
        conn.execute(send_ledger.delete())
    get_settings.cache_clear()
    rerun = abandoned_cart(batch_size=10)
    assert rerun.excluded.get("suppressed") == 3
