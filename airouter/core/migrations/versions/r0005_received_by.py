"""Which node (or receiver process) stored each instance.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("received_by", sa.String(128)))
