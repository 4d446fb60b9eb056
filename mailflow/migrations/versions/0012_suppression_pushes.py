"""suppression pushes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10 10:00:00

The addresses mailflow pushed to a provider's suppression list (its own manual and
one-click unsubscribes, sent to SendGrid's global unsubscribes), so each goes once.
What is pulled from the provider lands in mf_suppressions; where each list's pull got
to is a watermark (mf_watermarks, ``sendgrid:<list>``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mf_suppression_pushes",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("provider_list", sa.String(length=64), nullable=False),
        sa.Column("pushed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("email", "provider_list"),
    )


def downgrade() -> None:
    op.drop_table("mf_suppression_pushes")
