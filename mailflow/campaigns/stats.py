"""Experiment results: per arm, rates with confidence intervals, tests against control and holdout.

Definitions are the metrics contract's (``docs/metrics.md``, v2). Grain of
:func:`experiment_table` (and of ``mf_campaign_results``): one row per (campaign, arm, metric).

- arms: each variant, ``all_variants`` (the campaign as a whole) and ``holdout``;
- metrics (numerator / denominator): ``sent`` (sent / recipients), ``delivered``
  (delivered / sent), ``open`` (opened by a human / delivered), ``click`` (clicked /
  delivered), ``click_to_open`` (clicked / opened), ``itt_conversion`` (recipients with an
  order within 72 h / recipients). The holdout has ``itt_conversion`` only: it was never
  sent anything. Delivered, opened and clicked are the rollup's: a ``delivered`` event or
  any open or click proves delivery; opened is a human open (not ``sg_machine_open``) or a
  click (a click implies an open), so ``open`` is ``mf_engagement_totals.open_rate`` for the
  campaign's trigger;
- ``itt_conversion`` is intention to treat, not the rollup's last touch
  (``conversions_last_touch``): an order (not cancelled or refunded:
  ``mailflow.metrics.NOT_CONVERTING``) placed in ``(start, start + 72 h]`` — after the
  send, at most 72 h later — where ``start`` is the message's ``sent_at`` or, for the
  holdout and anyone not sent, the assignment time. Recipients are everyone assigned to
  the arm, and an order may count for a campaign and for a later trigger's message;
- ``ci_low``/``ci_high``: 95 % Wilson interval (``statsmodels`` ``proportion_confint``);
  ``diff_vs_control`` with a Newcombe interval (``confint_proportions_2indep``) and
  ``p_value_vs_control`` from a two-sided two-proportion z-test (``proportions_ztest``);
  control is the first variant; ``lift_vs_holdout`` is the relative difference of the
  conversion rate against the holdout's, with its own z-test p-value;
- ``verdict_vs_control`` / ``verdict_vs_holdout``: ``higher`` or ``lower`` when the
  two-sided p-value is below :data:`ALPHA` (0.05), else ``not significant``; results
  never name a winner on a difference that is not significant.

The split is checked too (:func:`split_check`, ``mf_campaign_split``): the arms' assigned
counts against the configured shares (each variant's share of the non-holdout part, and
``holdout_share``), a chi-square goodness-of-fit test (``scipy.stats.chisquare``); a
p-value below :data:`SRM_ALPHA` (0.001) flags a sample-ratio mismatch — the assignment
is broken somewhere, and no difference between the arms should be trusted.

Engagement comes from ``mf_events`` (linked to the ledger row) and conversions from
``orders``, read directly: the results do not wait for the metric rollup.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table
from sqlalchemy import Connection, Engine, delete, func, insert, select

from mailflow.campaigns.assign import HOLDOUT
from mailflow.clock import utcnow
from mailflow.metrics import NOT_CONVERTING
from mailflow.warehouse.schema import (
    campaign_assignments,
    campaign_results,
    campaign_split,
    events,
    orders,
    send_ledger,
)

CONVERSION_WINDOW = timedelta(hours=72)
ALL_VARIANTS = "all_variants"
METRICS = ("sent", "delivered", "open", "click", "click_to_open", "itt_conversion")
#: metric: (numerator column, denominator column) of :func:`_per_recipient`'s frame;
#: ``recipients`` is every row of the arm.
DEFINITIONS = {
    "sent": ("sent", "recipients"),
    "delivered": ("delivered", "sent"),
    "open": ("opened", "delivered"),
    "click": ("clicked", "delivered"),
    "click_to_open": ("clicked", "opened"),
    "itt_conversion": ("converted", "recipients"),
}
#: Two-sided significance level of the verdicts.
ALPHA = 0.05
#: A split check below this p-value flags a sample-ratio mismatch.
SRM_ALPHA = 0.001
NOT_SIGNIFICANT = "not significant"
_CHUNK = 5_000


@dataclass(frozen=True)
class Proportion:
    """Rate of ``numerator`` in ``denominator`` with its 95 % Wilson interval."""

    numerator: int
    denominator: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None


def proportion(numerator: int, denominator: int, *, alpha: float = 0.05) -> Proportion:
    """The rate and its Wilson interval (None when the denominator is 0)."""
    from statsmodels.stats.proportion import proportion_confint

    if denominator <= 0:
        return Proportion(numerator, denominator, None, None, None)
    low, high = proportion_confint(numerator, denominator, alpha=alpha, method="wilson")
    return Proportion(numerator, denominator, numerator / denominator, float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b``: the difference, its 95 % interval and a z-test p-value."""

    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None


def compare(x_a: int, n_a: int, x_b: int, n_b: int, *, alpha: float = 0.05) -> Comparison:
    """Two independent proportions: two-sided two-proportion z-test and Newcombe interval.

    When both groups are all-0 or all-1 the test has no variance: the difference is 0 and
    the p-value 1.
    """
    from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

    if n_a <= 0 or n_b <= 0:
        return Comparison(None, None, None, None)
    diff = x_a / n_a - x_b / n_b
    pooled = (x_a + x_b) / (n_a + n_b)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = confint_proportions_2indep(
            x_a, n_a, x_b, n_b, method="newcomb", compare="diff", alpha=alpha
        )
        if pooled in (0.0, 1.0):
            p_value = 1.0
        else:
            _, p = proportions_ztest([x_a, x_b], [n_a, n_b], alternative="two-sided")
            p_value = float(p)
    return Comparison(diff, _finite(low), _finite(high), p_value)


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if np.isfinite(number) else None


# -- reading the campaign's outcome --------------------------------------------------------


def _per_recipient(conn: Connection, campaign: str) -> pd.DataFrame:
    """One row per assigned customer: arm, start, sent, opened, clicked, converted."""
    trigger = f"campaign:{campaign}"
    a, lg = campaign_assignments.c, send_ledger.c
    frame = pd.DataFrame(
        conn.execute(
            select(
                a.customer_id, a.arm, a.assigned_at, lg.id.label("ledger_id"), lg.status, lg.sent_at
            )  # fmt: skip
            .select_from(campaign_assignments)
            .outerjoin(send_ledger, (lg.trigger == trigger) & (lg.customer_id == a.customer_id))
            .where(a.campaign == campaign)
        ).all(),
        columns=["customer_id", "arm", "assigned_at", "ledger_id", "status", "sent_at"],
    )
    if frame.empty:
        return frame
    frame["sent"] = frame["status"] == "sent"
    engaged = conn.execute(
        select(events.c.ledger_id, events.c.event, events.c.machine_open)
        .join(send_ledger, send_ledger.c.id == events.c.ledger_id)
        .where(
            send_ledger.c.trigger == trigger,
            events.c.event.in_(("delivered", "open", "click")),
        )
        .distinct()
    ).all()
    seen = {lid for lid, _, _ in engaged}  # any of them proves delivery
    human = {lid for lid, ev, machine in engaged if ev == "open" and not machine}
    clicked = {lid for lid, ev, _ in engaged if ev == "click"}
    frame["delivered"] = frame["sent"] & frame["ledger_id"].isin(seen)
    # A click implies the message was opened (images off hides the open pixel).
    frame["opened"] = frame["sent"] & frame["ledger_id"].isin(human | clicked)
    frame["clicked"] = frame["sent"] & frame["ledger_id"].isin(clicked)

    starts = pd.to_datetime(frame["sent_at"].where(frame["sent"], frame["assigned_at"]))
    frame["start"] = starts.fillna(pd.to_datetime(frame["assigned_at"]))
    earliest = frame["start"].min().to_pydatetime()
    ids = [int(x) for x in frame["customer_id"].unique()]
    found: list[tuple[int, Any]] = []
    for i in range(0, len(ids), _CHUNK):
        found += conn.execute(
            select(orders.c.customer_id, orders.c.created_at).where(
                orders.c.customer_id.in_(ids[i : i + _CHUNK]),
                orders.c.created_at >= earliest,
                orders.c.status.not_in(NOT_CONVERTING),
            )
        ).all()
    placed = pd.DataFrame(found, columns=["customer_id", "ordered_at"])
    if placed.empty:
        frame["converted"] = False
        return frame
    placed["ordered_at"] = pd.to_datetime(placed["ordered_at"])
    joined = frame[["customer_id", "start"]].merge(placed, on="customer_id")
    hit = joined[
        (joined["ordered_at"] > joined["start"])
        & (joined["ordered_at"] <= joined["start"] + CONVERSION_WINDOW)
    ]
    frame["converted"] = frame["customer_id"].isin(set(hit["customer_id"]))
    return frame


def _arm_order(frame: pd.DataFrame, variants: Sequence[str] | None) -> list[str]:
    present = [str(x) for x in frame["arm"].unique()]
    ordered = [v for v in (variants or []) if v in present]
    ordered += sorted(x for x in present if x not in ordered and x != HOLDOUT)
    return ordered


def compute_results(
    frame: pd.DataFrame, *, campaign: str, variants: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The result rows from one row per recipient (see the module docstring)."""
    if frame.empty:
        return []
    arms = _arm_order(frame, variants)
    control = arms[0] if arms else None
    groups: dict[str, pd.DataFrame] = {arm: frame[frame["arm"] == arm] for arm in arms}
    if arms:
        groups[ALL_VARIANTS] = frame[frame["arm"] != HOLDOUT]
    holdout = frame[frame["arm"] == HOLDOUT]
    if not holdout.empty:
        groups[HOLDOUT] = holdout

    def counts(g: pd.DataFrame, metric: str) -> tuple[int, int]:
        num, den = DEFINITIONS[metric]
        n = len(g) if den == "recipients" else int(g[den].sum())
        return int(g[num].sum()), n

    rows: list[dict[str, Any]] = []
    for arm, g in groups.items():
        for metric in ("itt_conversion",) if arm == HOLDOUT else METRICS:
            x, n = counts(g, metric)
            p = proportion(x, n)
            row: dict[str, Any] = {"campaign": campaign, "arm": arm, "metric": metric}
            row.update(asdict(p))
            row.update(
                control_arm=control,
                diff_vs_control=None,
                diff_ci_low=None,
                diff_ci_high=None,
                p_value_vs_control=None,
                verdict_vs_control=None,
                lift_vs_holdout=None,
                p_value_vs_holdout=None,
                verdict_vs_holdout=None,
            )
            if arm not in (control, ALL_VARIANTS, HOLDOUT) and control is not None:
                cx, cn = counts(groups[control], metric)
                cmp = compare(x, n, cx, cn)
                row.update(
                    diff_vs_control=cmp.diff,
                    diff_ci_low=cmp.ci_low,
                    diff_ci_high=cmp.ci_high,
                    p_value_vs_control=cmp.p_value,
                    verdict_vs_control=verdict(cmp),
                )
            if metric == "itt_conversion" and arm != HOLDOUT and HOLDOUT in groups:
                hx, hn = counts(groups[HOLDOUT], metric)
                vs = compare(x, n, hx, hn)
                h_rate = hx / hn if hn else 0.0
                if vs.diff is not None and h_rate > 0:
                    row["lift_vs_holdout"] = vs.diff / h_rate
                row["p_value_vs_holdout"] = vs.p_value
                row["verdict_vs_holdout"] = verdict(vs)
            rows.append(row)
    return rows


def verdict(comparison: Comparison, *, alpha: float = ALPHA) -> str | None:
    """``higher`` / ``lower`` when the two-sided p-value is below ``alpha``, else
    ``not significant`` (None when there is nothing to compare)."""
    if comparison.p_value is None or comparison.diff is None:
        return None
    if comparison.p_value >= alpha or comparison.diff == 0:
        return NOT_SIGNIFICANT
    return "higher" if comparison.diff > 0 else "lower"


@dataclass(frozen=True)
class SplitCheck:
    """The configured split beside the observed one, and the sample-ratio-mismatch test."""

    campaign: str
    configured: dict[str, float]  # arm -> share of everyone assigned
    assigned: dict[str, int]
    chi2: float | None
    p_value: float | None
    alpha: float = SRM_ALPHA

    @property
    def mismatch(self) -> bool:
        """True when the observed split is too unlikely under the configured one."""
        return self.p_value is not None and self.p_value < self.alpha

    def rows(self) -> list[dict[str, Any]]:
        """One ``mf_campaign_split`` row per arm (without ``computed_at``)."""
        total = sum(self.assigned.values())
        arms = list(self.configured) + [a for a in self.assigned if a not in self.configured]
        return [
            {
                "campaign": self.campaign,
                "arm": arm,
                "configured_share": self.configured.get(arm, 0.0),
                "assigned": self.assigned.get(arm, 0),
                "expected": total * self.configured.get(arm, 0.0),
                "observed_share": self.assigned.get(arm, 0) / total if total else None,
                "srm_chi2": self.chi2,
                "srm_p_value": self.p_value,
                "srm": self.mismatch,
            }
            for arm in arms
        ]

    def summary(self) -> str:
        """One line for a terminal or an artifact."""
        if self.p_value is None:
            return "split check: not enough recipients to test"
        split = ", ".join(
            f"{r['arm']} {r['assigned']:,} ({_pct(r['observed_share'])} vs "
            f"{_pct(r['configured_share'])} configured)"
            for r in self.rows()
        )
        head = (
            f"SAMPLE RATIO MISMATCH (p = {_p(self.p_value)} < {self.alpha:g}): do not trust "
            "these differences"
            if self.mismatch
            else f"split as configured (chi-square p = {_p(self.p_value)})"
        )
        return f"{head}: {split}"


def configured_split(
    variants: Sequence[tuple[str, float]], holdout_share: float
) -> dict[str, float]:
    """Each arm's configured share of everyone assigned: ``holdout_share`` for the holdout,
    a variant's share of the rest (as :func:`mailflow.campaigns.assign.arm_of` splits)."""
    total = sum(share for _, share in variants)
    split = {name: (1.0 - holdout_share) * share / total for name, share in variants}
    if holdout_share > 0:
        split[HOLDOUT] = holdout_share
    return split


def sample_ratio_mismatch(
    campaign: str, assigned: dict[str, int], configured: dict[str, float]
) -> SplitCheck:
    """Chi-square goodness of fit of the assigned counts against the configured shares.

    An arm assigned someone though its configured share is 0 is a mismatch outright
    (p = 0). Fewer than two arms, or no one assigned: no test (p None).
    """
    from scipy.stats import chisquare

    arms = list(configured) + [a for a in assigned if a not in configured]
    observed = np.array([assigned.get(a, 0) for a in arms], dtype=float)
    total = observed.sum()
    if len(arms) < 2 or total <= 0:
        return SplitCheck(campaign, dict(configured), dict(assigned), None, None)
    if any(configured.get(a, 0.0) <= 0 and assigned.get(a, 0) > 0 for a in arms):
        return SplitCheck(campaign, dict(configured), dict(assigned), float("inf"), 0.0)
    shares = np.array([configured.get(a, 0.0) for a in arms])
    keep = shares > 0
    expected = total * shares[keep] / shares[keep].sum()
    stat, p = chisquare(observed[keep], expected)
    return SplitCheck(campaign, dict(configured), dict(assigned), float(stat), float(p))


def split_check(engine: Engine, campaign_name: str) -> SplitCheck | None:
    """Check the stored campaign's split, store it in ``mf_campaign_split``, return it.

    None when the campaign's definition is not stored (no configured split to check).
    """
    from mailflow.campaigns.trigger import load_stored

    a = campaign_assignments.c
    with engine.connect() as conn:
        stored = load_stored(conn, campaign_name)
        assigned = {
            str(arm): int(n)
            for arm, n in conn.execute(
                select(a.arm, func.count()).where(a.campaign == campaign_name).group_by(a.arm)
            )
        }
    if stored is None:
        return None
    configured = configured_split(
        [(v.name, v.share) for v in stored.variants], stored.holdout_share
    )
    check = sample_ratio_mismatch(campaign_name, assigned, configured)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(delete(campaign_split).where(campaign_split.c.campaign == campaign_name))
        conn.execute(insert(campaign_split), [{**r, "computed_at": now} for r in check.rows()])
    return check


def experiment_table(
    engine: Engine, campaign_name: str, *, variants: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Compute the campaign's results now, store them in ``mf_campaign_results``, return them.

    ``variants`` orders the arms (the first is control); by default the stored campaign's
    variants, else alphabetical.
    """
    with engine.connect() as conn:
        if variants is None:
            from mailflow.campaigns.trigger import load_stored

            stored = load_stored(conn, campaign_name)
            variants = [v.name for v in stored.variants] if stored is not None else None
        frame = _per_recipient(conn, campaign_name)
    rows = compute_results(frame, campaign=campaign_name, variants=variants)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(delete(campaign_results).where(campaign_results.c.campaign == campaign_name))
        if rows:
            conn.execute(insert(campaign_results), [{**r, "computed_at": now} for r in rows])
    return rows


# -- showing them ----------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _pp(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.2f} pp"


def _p(value: float | None) -> str:
    return "–" if value is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


def display_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The rows as text cells (for a Prefect table artifact or a terminal)."""
    out = []
    for r in rows:
        diff = _pp(r["diff_vs_control"])
        if r["diff_ci_low"] is not None:
            diff += f" [{_pp(r['diff_ci_low'])}, {_pp(r['diff_ci_high'])}]"
        out.append(
            {
                "arm": r["arm"],
                "metric": r["metric"],
                "count": f"{r['numerator']:,} / {r['denominator']:,} {DEFINITIONS[r['metric']][1]}",
                "rate": _pct(r["rate"], 2),
                "95% CI": f"{_pct(r['ci_low'], 2)} – {_pct(r['ci_high'], 2)}"
                if r["ci_low"] is not None
                else "–",
                f"vs {r['control_arm']}": diff,
                "p (control)": _p(r["p_value_vs_control"]),
                "verdict (control)": r.get("verdict_vs_control") or "–",
                "lift vs holdout": _pct(r["lift_vs_holdout"]),
                "p (holdout)": _p(r["p_value_vs_holdout"]),
                "verdict (holdout)": r.get("verdict_vs_holdout") or "–",
            }
        )
    return out


def render_table(rows: Sequence[dict[str, Any]], *, title: str = "experiment results") -> Table:
    """A rich Table of :func:`experiment_table` rows (for ``mailflow report --campaign``)."""
    table = Table(title=title)
    cells = display_rows(rows)
    headers = list(cells[0]) if cells else ["arm", "metric", "count", "rate"]
    for h in headers:
        table.add_column(h, justify="left" if h in ("arm", "metric") else "right")
    for c in cells:
        table.add_row(*c.values())
    return table
