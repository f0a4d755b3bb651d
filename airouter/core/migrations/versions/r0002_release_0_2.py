"""Release 0.2: a study interrupted by a crash is held; a job keeps its rule's SEG type and
the failed job it retries.

A database from before the migrations may have some of these already (those builds added
columns as they went): only the missing ones are added.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ADDED: dict[str, list[sa.Column[Any]]] = {
    "studies": [sa.Column("interrupted_at", sa.DateTime)],
    "jobs": [sa.Column("seg_type", sa.String(16)), sa.Column("retry_of", sa.Integer)],
}


def upgrade() -> None:
    """Apply this revision."""
    inspector = sa.inspect(op.get_bind())
    for table, columns in _ADDED.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        missing = [c for c in columns if c.name not in present]
        if missing:
            with op.batch_alter_table(table) as batch:
                for column in missing:
                    batch.add_column(column)
