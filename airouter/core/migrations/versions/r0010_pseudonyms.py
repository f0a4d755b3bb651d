"""Pseudonyms: the UIDs of de-identified copies sent off-site, and their originals.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "pseudonyms",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pseudonym_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("original_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_pseudonyms_study_uid", "pseudonyms", ["study_uid"])
