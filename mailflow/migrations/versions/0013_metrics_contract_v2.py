"""metrics contract v2

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 14:30:00

The metrics contract v2 (docs/metrics.md):
- ``mf_events.machine_open``: SendGrid's ``sg_machine_open`` flag of an open, filled from
  the stored raw events;
- ``mf_message_facts.machine_opens`` beside the human ``opens``;
- ``mf_metrics_daily`` rebuilt: ``conversions`` is ``conversions_last_touch``, machine opens
  apart, median and p90 seconds to open and to click; the rollup state is reset, so the
  next rollup run is a full rebuild (the metric tables are derived data);
- the views ``mf_engagement_daily`` / ``mf_engagement_totals`` with the v2 rates;
- ``mf_campaign_results.verdict_vs_control`` / ``verdict_vs_holdout`` and the table
  ``mf_campaign_split`` (configured vs observed split, sample-ratio-mismatch check).
  Stored results were computed on v1's definitions (an unlabelled ``conversion``, opens
  of sent): they are deleted; the engagement-rollup flow recomputes those of recent
  campaigns and ``mailflow report --campaign NAME`` any campaign's.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# Frozen copies, as every migration's: v1 (0003) for the downgrade, v2 as of this
# revision (mailflow.report.RATES is the living list; a test checks the views against it).
_V1_COUNTS = (
    "sent", "delivered", "bounced", "blocked", "dropped", "deferred", "unique_opens",
    "unique_clicks", "opens", "clicks", "unsubscribes", "spam_reports", "conversions",
    "orders", "revenue",
)  # fmt: skip
_V1_RATES = (
    ("delivery_rate", "delivered", "sent"),
    ("bounce_rate", "bounced", "sent"),
    ("open_rate", "unique_opens", "delivered"),
    ("click_rate", "unique_clicks", "delivered"),
    ("click_to_open_rate", "unique_clicks", "unique_opens"),
    ("complaint_rate", "spam_reports", "delivered"),
    ("unsubscribe_rate", "unsubscribes", "delivered"),
    ("conversion_rate", "conversions", "delivered"),
)
_COUNTS = (
    "sent", "delivered", "bounced", "blocked", "dropped", "deferred", "unique_opens",
    "unique_clicks", "opens", "clicks", "unique_machine_opens", "machine_opens",
    "unsubscribes", "spam_reports", "conversions_last_touch", "orders", "revenue",
)  # fmt: skip
#: name, numerator, denominator (NULL where the denominator is 0): mailflow.report.RATES.
_RATES = (
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
#: Per day only: percentiles do not add up over days.
_TIMES = (
    "median_seconds_to_open",
    "p90_seconds_to_open",
    "median_seconds_to_click",
    "p90_seconds_to_click",
)


def _create_views(
    counts: Sequence[str], rates: Sequence[tuple[str, str, str]], times: Sequence[str]
) -> None:
    rate_sql = ",\n    ".join(
        f"CASE WHEN {den} > 0 THEN CAST({num} AS FLOAT) / {den} END AS {name}"
        for name, num, den in rates
    )
    daily_columns = ", ".join((*counts, *times))
    op.execute(
        f"CREATE VIEW mf_engagement_daily AS\n"
        f"SELECT trigger, variant, day, {daily_columns},\n    {rate_sql}\n"
        f"FROM mf_metrics_daily"
    )
    sums = ", ".join(f"SUM({c}) AS {c}" for c in counts)
    op.execute(
        f"CREATE VIEW mf_engagement_totals AS\n"
        f"SELECT trigger, variant, first_day, last_day, {', '.join(counts)},\n    {rate_sql}\n"
        f"FROM (\n    SELECT trigger, variant, MIN(day) AS first_day, MAX(day) AS last_day,\n"
        f"        {sums}\n    FROM mf_metrics_daily\n    GROUP BY trigger, variant\n"
        f") AS per_variant"
    )


def _drop_views() -> None:
    op.execute("DROP VIEW mf_engagement_totals")
    op.execute("DROP VIEW mf_engagement_daily")


def _metrics_daily(counts: Sequence[str], times: Sequence[str]) -> None:
    op.create_table(
        "mf_metrics_daily",
        sa.Column("trigger", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        *(sa.Column(c, sa.Integer(), nullable=False) for c in counts if c != "revenue"),
        sa.Column("revenue", sa.Numeric(precision=14, scale=2), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        *(sa.Column(c, sa.Float(), nullable=True) for c in times),
        sa.PrimaryKeyConstraint("trigger", "variant", "day", name=op.f("pk_mf_metrics_daily")),
    )


def _machine(raw: object) -> bool:
    flag = raw.get("sg_machine_open") if isinstance(raw, dict) else None
    return flag is True or (isinstance(flag, str) and flag.strip().lower() in ("true", "1"))


def _reset_rollup() -> None:
    # The metric tables are derived: the next rollup run rebuilds them in full.
    op.execute("DELETE FROM mf_rollup_state WHERE name = 'engagement'")
    op.execute("DELETE FROM mf_message_facts")
    op.execute("DELETE FROM mf_order_attribution")


def upgrade() -> None:
    with op.batch_alter_table("mf_events") as batch_op:
        batch_op.add_column(
            sa.Column("machine_open", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    events = sa.table("mf_events", sa.column("id"), sa.column("event"), sa.column("raw", sa.JSON))
    conn = op.get_bind()
    machine = [
        row.id
        for row in conn.execute(
            sa.select(events.c.id, events.c.raw).where(events.c.event == "open")
        )
        if _machine(row.raw)
    ]
    flagged = sa.table("mf_events", sa.column("id"), sa.column("machine_open", sa.Boolean))
    for start in range(0, len(machine), 5_000):
        conn.execute(
            flagged.update()
            .where(flagged.c.id.in_(machine[start : start + 5_000]))
            .values(machine_open=True)
        )

    _drop_views()
    with op.batch_alter_table("mf_message_facts") as batch_op:
        batch_op.add_column(
            sa.Column("machine_opens", sa.Integer(), nullable=False, server_default="0")
        )
    op.drop_table("mf_metrics_daily")
    _metrics_daily(_COUNTS, _TIMES)
    _reset_rollup()
    _create_views(_COUNTS, _RATES, _TIMES)

    op.execute("DELETE FROM mf_campaign_results")
    with op.batch_alter_table("mf_campaign_results") as batch_op:
        batch_op.add_column(sa.Column("verdict_vs_control", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("verdict_vs_holdout", sa.String(length=16), nullable=True))
    op.create_table(
        "mf_campaign_split",
        sa.Column("campaign", sa.String(length=48), nullable=False),
        sa.Column("arm", sa.String(length=32), nullable=False),
        sa.Column("configured_share", sa.Float(), nullable=False),
        sa.Column("assigned", sa.Integer(), nullable=False),
        sa.Column("expected", sa.Float(), nullable=False),
        sa.Column("observed_share", sa.Float(), nullable=True),
        sa.Column("srm_chi2", sa.Float(), nullable=True),
        sa.Column("srm_p_value", sa.Float(), nullable=True),
        sa.Column("srm", sa.Boolean(), nullable=False),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "arm", name=op.f("pk_mf_campaign_split")),
    )


def downgrade() -> None:
    op.drop_table("mf_campaign_split")
    op.execute("DELETE FROM mf_campaign_results")
    with op.batch_alter_table("mf_campaign_results") as batch_op:
        batch_op.drop_column("verdict_vs_holdout")
        batch_op.drop_column("verdict_vs_control")
    _drop_views()
    op.drop_table("mf_metrics_daily")
    _metrics_daily(_V1_COUNTS, ())
    with op.batch_alter_table("mf_message_facts") as batch_op:
        batch_op.drop_column("machine_opens")
    _reset_rollup()
    _create_views(_V1_COUNTS, _V1_RATES, ())
    with op.batch_alter_table("mf_events") as batch_op:
        batch_op.drop_column("machine_open")
