"""ledger history

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-02 22:10:00

Every decision taken on a ledger row after it was sent or tried — confirmed by a
provider event, handed back for a resend because no event named it, skipped or
expired because it went stale — is kept here beside the row's current state.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mf_ledger_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "ledger_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("from_status", sa.String(length=16), nullable=False),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_mf_ledger_history_ledger_id", "mf_ledger_history", ["ledger_id"])
    op.create_index("ix_mf_ledger_history_at", "mf_ledger_history", ["at"])


def downgrade() -> None:
    op.drop_index("ix_mf_ledger_history_at", table_name="mf_ledger_history")
    op.drop_index("ix_mf_ledger_history_ledger_id", table_name="mf_ledger_history")
    op.drop_table("mf_ledger_history")
