"""order attribution

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 00:20:00

Which message each converting order is credited to. An order that moves to another
customer (a guest order linked to an account, merged customer records) must leave the
message it was credited to: the incremental rollup finds that message's customer here.
Filled by the rollup; the next full rebuild (nightly) fills it for older orders.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mf_order_attribution",
        sa.Column("order_id", _ID, autoincrement=False, nullable=False),
        sa.Column("ledger_id", _ID, nullable=False),
        sa.Column("customer_id", _ID, nullable=False),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index("ix_mf_order_attribution_ledger_id", "mf_order_attribution", ["ledger_id"])
    op.create_index("ix_mf_order_attribution_customer_id", "mf_order_attribution", ["customer_id"])


def downgrade() -> None:
    op.drop_table("mf_order_attribution")
