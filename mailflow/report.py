"""The metric table for a period and its funnel chart (``mailflow report``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from rich.table import Table
from sqlalchemy import Engine, func, select

from mailflow.warehouse.schema import metrics_daily

#: Summed columns, in display order (``mf_metrics_daily``; docs/metrics.md, contract v2).
COUNTS = (
    "sent",
    "delivered",
    "bounced",
    "blocked",
    "dropped",
    "deferred",
    "unique_opens",
    "unique_clicks",
    "opens",
    "clicks",
    "unique_machine_opens",
    "machine_opens",
    "unsubscribes",
    "spam_reports",
    "conversions_last_touch",
    "orders",
)
#: name, numerator, denominator: the same definitions as the ``mf_engagement_*`` views
#: (migration 0013) and docs/metrics.md.
RATES = (
    ("delivery_rate", "delivered", "sent"),
    ("bounce_rate", "bounced", "sent"),
    ("block_rate", "blocked", "sent"),
    ("drop_rate", "dropped", "sent"),
    ("open_rate", "unique_opens", "delivered"),
    ("machine_open_rate", "unique_machine_opens", "delivered"),
    ("click_rate", "unique_clicks", "delivered"),
    ("click_to_open_rate", "unique_clicks", "unique_opens"),
    ("complaint_rate", "spam_reports", "delivered"),
    ("unsubscribe_rate", "unsubscribes", "delivered"),
    ("conversion_rate_last_touch", "conversions_last_touch", "sent"),
)
_DENOMINATOR = {name: den for name, _, den in RATES}
#: The funnel stages: label, the column each counts, the rate shown beside it (its
#: denominator is said with it, on the chart as in the table).
FUNNEL = (
    ("sent", "sent", None),
    ("delivered", "delivered", "delivery_rate"),
    ("opened (human)", "unique_opens", "open_rate"),
    ("clicked", "unique_clicks", "click_rate"),
    ("converted (last touch)", "conversions_last_touch", "conversion_rate_last_touch"),
)


_COLOURS = ["#4c72b0", "#55a868", "#c4a000", "#dd8452", "#8172b3"]


@dataclass(frozen=True, slots=True)
class Period:
    """Send days from ``since`` to ``until``, both included."""

    since: date
    until: date

    def __post_init__(self) -> None:
        if self.since > self.until:
            raise ValueError(
                f"the period starts ({self.since}) after it ends ({self.until}); swap the dates"
            )


def with_rates(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` plus every rate (``None`` where the denominator is 0)."""
    out = dict(row)
    for name, num, den in RATES:
        out[name] = row[num] / row[den] if row[den] else None
    return out


def period_metrics(
    engine: Engine, period: Period, *, trigger: str | None = None
) -> list[dict[str, Any]]:
    """One row per (trigger, variant) with the sums over the period's send days and rates."""
    m = metrics_daily.c
    stmt = (
        select(
            m.trigger,
            m.variant,
            *(func.sum(m[c]).label(c) for c in COUNTS),
            func.sum(m.revenue).label("revenue"),
        )
        .where(m.day >= period.since, m.day <= period.until)
        .group_by(m.trigger, m.variant)
        .order_by(m.trigger, m.variant)
    )
    if trigger is not None:
        stmt = stmt.where(m.trigger == trigger)
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        with_rates({**r, **{c: int(r[c]) for c in COUNTS}, "revenue": float(r["revenue"])})
        for r in rows
    ]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


#: How a denominator is named beside a percentage.
_OF = {"unique_opens": "opened"}


def denominator(rate: str) -> str:
    """What ``rate`` is a share of, as the report and the chart name it."""
    den = _DENOMINATOR[rate]
    return _OF.get(den, den)


def line_label(label: str, rate: str | None) -> str:
    """A report table's line label, with its rate's denominator: ``opened (% of delivered)``."""
    return label if rate is None else f"{label} (% of {denominator(rate)})"


#: (label, count column, rate shown beside it) — one line of a report table each.
_LINES = (
    *FUNNEL[:2],
    ("bounced (hard)", "bounced", "bounce_rate"),
    ("blocked", "blocked", "block_rate"),
    ("dropped", "dropped", "drop_rate"),
    *FUNNEL[2:4],
    ("machine-opened", "unique_machine_opens", "machine_open_rate"),
    ("click-to-open", None, "click_to_open_rate"),
    ("unsubscribed", "unsubscribes", "unsubscribe_rate"),
    ("spam reports", "spam_reports", "complaint_rate"),
    FUNNEL[4],
    ("revenue (last touch)", "revenue", None),
)


def _cell(row: Mapping[str, Any], count: str | None, rate: str | None) -> str:
    """A table cell: the count and its rate (the line label says of what)."""
    if count == "revenue":
        return f"{row['revenue']:,.2f}"
    if count is None:
        return _pct(row[rate]) if rate is not None else ""
    return f"{row[count]:,}" if rate is None else f"{row[count]:,} ({_pct(row[rate])})"


def metrics_tables(rows: Sequence[Mapping[str, Any]]) -> list[Table]:
    """One table per trigger: a line per metric, a column per variant and their total.

    Metrics down the side keep it readable in an 80-column terminal however many
    metrics there are; a trigger rarely has more than a few variants.
    """
    by_trigger: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_trigger.setdefault(r["trigger"], []).append(r)
    tables = []
    for trigger, variants in sorted(by_trigger.items()):
        columns = list(variants)
        if len(variants) > 1:
            total = {c: sum(v[c] for v in variants) for c in (*COUNTS, "revenue")}
            columns.append(with_rates({"trigger": trigger, "variant": "all", **total}))
        table = Table(title=trigger, title_justify="left", title_style="bold")
        table.add_column("")
        for c in columns:
            table.add_column(c["variant"], justify="right")
        for label, count, rate in _LINES:
            table.add_row(line_label(label, rate), *(_cell(c, count, rate) for c in columns))
        tables.append(table)
    return tables


def artifact_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`period_metrics` rows shaped for a Prefect table artifact."""
    keep = ("trigger", "variant", *COUNTS)
    return [
        {k: r[k] for k in keep}
        | {
            "revenue": round(r["revenue"], 2),
            **{name: None if r[name] is None else round(r[name], 4) for name, _, _ in RATES},
        }
        for r in rows
    ]


def funnel_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trigger: the counts of ``rows`` (all variants) added up, with their rates."""
    per_trigger: dict[str, dict[str, Any]] = {}
    for r in rows:
        totals = per_trigger.setdefault(r["trigger"], dict.fromkeys(COUNTS, 0))
        for column in COUNTS:
            totals[column] += int(r[column])
    return {trigger: with_rates(totals) for trigger, totals in per_trigger.items()}


def funnel_labels(totals: Mapping[str, Any]) -> list[str]:
    """The text beside each funnel bar: the table's cell, its denominator said inside:
    ``34 (35.1% of delivered)`` where the table's line ``opened (human) (% of delivered)``
    shows ``34 (35.1%)``."""
    out = []
    for _, column, rate in FUNNEL:
        cell = _cell(totals, column, rate)
        out.append(cell if rate is None else f"{cell[:-1]} of {denominator(rate)})")
    return out


def funnel_chart(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Write a PNG with one funnel per trigger: sent → delivered → opened → clicked → converted.

    Each bar says its rate and that rate's denominator, as the report table does.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    per_trigger = funnel_rows(rows)
    if not per_trigger:
        raise ValueError("no metric rows in this period: nothing to chart (run the rollup first)")

    labels = [stage for stage, _, _ in FUNNEL]
    fig, axes = plt.subplots(
        len(per_trigger), 1, figsize=(8, 1.0 + 2.2 * len(per_trigger)), squeeze=False
    )
    for ax, (trigger, totals) in zip(axes[:, 0], sorted(per_trigger.items()), strict=True):
        values = [totals[column] for _, column, _ in FUNNEL]
        bars = ax.barh(labels, values, color=_COLOURS)
        ax.invert_yaxis()
        ax.set_title(trigger, loc="left", fontsize=11)
        ax.set_xlim(0, max(values[0], 1) * 1.25)
        for bar, text in zip(bars, funnel_labels(totals), strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {text}",
                va="center",
                fontsize=9,
            )
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
