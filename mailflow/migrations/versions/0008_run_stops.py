"""run stop marks

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-02 19:00:00

A run that stops on a refused key leaves a row here; batches of that run in other
processes (the Dask runner) look for it before they send. Before, the mark was a
prefix of the ``reason`` text on handed-back ledger rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mf_run_stops",
        sa.Column("flow_run_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("flow_run_id"),
    )


def downgrade() -> None:
    op.drop_table("mf_run_stops")
