"""Evaluations: each structure of a result compared with the clinician's version sent back
(Dice, HD95, surface Dice, volumes), with the case's subgroup.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("evaluated_job_id", sa.Integer, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("reference_uid", sa.String(64), nullable=False),
        sa.Column("structure", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("dice", sa.Float, nullable=False),
        sa.Column("hd95_mm", sa.Float),
        sa.Column("surface_dice", sa.Float),
        sa.Column("volume_ml", sa.Float, nullable=False),
        sa.Column("reference_volume_ml", sa.Float, nullable=False),
        sa.Column("subgroup", sa.JSON, nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_evaluations_job_id", "evaluations", ["job_id"])
    op.create_index("ix_evaluations_evaluated_job_id", "evaluations", ["evaluated_job_id"])
    op.create_index("ix_evaluations_study_uid", "evaluations", ["study_uid"])
