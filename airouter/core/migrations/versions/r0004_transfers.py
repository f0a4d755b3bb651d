"""Several nodes on one database: which studies each node is receiving right now, so that a
study completes once no node is receiving it (and is held, not completed, when the node that
was receiving it died).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "transfers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("conn", sa.String(32), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("lease_until", sa.DateTime, nullable=False),
    )
