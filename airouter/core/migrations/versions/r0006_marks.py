"""Durability marks: until when every index commit is known to be on disk (the index commits
without an fsync of its own; a mark written with one covers every commit before it).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "marks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
    )
