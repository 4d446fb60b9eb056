"""campaigns, segments and experiments

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 08:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mf_campaigns",
        sa.Column("name", sa.String(length=48), nullable=False),
        sa.Column("trigger", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("template", sa.String(length=64), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("definition_hash", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_mf_campaigns")),
        sa.UniqueConstraint("trigger", name=op.f("uq_mf_campaigns_trigger")),
    )
    op.create_table(
        "mf_campaign_approvals",
        sa.Column("id", _ID, nullable=False),
        sa.Column("campaign", sa.String(length=48), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("definition_hash", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("approver", sa.String(length=200), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("preview", sa.JSON(), nullable=True),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mf_campaign_approvals")),
    )
    op.create_index(
        op.f("ix_mf_campaign_approvals_campaign"), "mf_campaign_approvals", ["campaign"]
    )
    op.create_index(
        op.f("ix_mf_campaign_approvals_flow_run_id"), "mf_campaign_approvals", ["flow_run_id"]
    )
    op.create_table(
        "mf_campaign_assignments",
        sa.Column("campaign", sa.String(length=48), nullable=False),
        sa.Column("customer_id", _ID, nullable=False, autoincrement=False),
        sa.Column("arm", sa.String(length=32), nullable=False),
        sa.Column("assigned_at", sa.DateTime(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("campaign", "customer_id", name=op.f("pk_mf_campaign_assignments")),
    )
    op.create_index(
        "ix_mf_campaign_assignments_campaign_arm", "mf_campaign_assignments", ["campaign", "arm"]
    )
    op.create_table(
        "mf_campaign_results",
        sa.Column("campaign", sa.String(length=48), nullable=False),
        sa.Column("arm", sa.String(length=32), nullable=False),
        sa.Column("metric", sa.String(length=16), nullable=False),
        sa.Column("numerator", sa.Integer(), nullable=False),
        sa.Column("denominator", sa.Integer(), nullable=False),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("control_arm", sa.String(length=32), nullable=True),
        sa.Column("diff_vs_control", sa.Float(), nullable=True),
        sa.Column("diff_ci_low", sa.Float(), nullable=True),
        sa.Column("diff_ci_high", sa.Float(), nullable=True),
        sa.Column("p_value_vs_control", sa.Float(), nullable=True),
        sa.Column("lift_vs_holdout", sa.Float(), nullable=True),
        sa.Column("p_value_vs_holdout", sa.Float(), nullable=True),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", "arm", "metric", name=op.f("pk_mf_campaign_results")),
    )


def downgrade() -> None:
    op.drop_table("mf_campaign_results")
    op.drop_index("ix_mf_campaign_assignments_campaign_arm", table_name="mf_campaign_assignments")
    op.drop_table("mf_campaign_assignments")
    op.drop_index(op.f("ix_mf_campaign_approvals_flow_run_id"), table_name="mf_campaign_approvals")
    op.drop_index(op.f("ix_mf_campaign_approvals_campaign"), table_name="mf_campaign_approvals")
    op.drop_table("mf_campaign_approvals")
    op.drop_table("mf_campaigns")
