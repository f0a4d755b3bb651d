"""The state store of release 0.1.

On an empty database this creates the tables as release 0.1 had them. A database that already
has them (release 0.1, or a later build from before the migrations, which added columns as it
went) is adopted as it is: the next revisions add what it lacks.

On PostgreSQL the text columns that hold values from the wire are unbounded: it enforces
lengths that SQLite does not, and a scanner's over-long Patient ID or description must still
be indexed. Enumerations are text, not native enum types (new members need no migration).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    if sa.inspect(op.get_bind()).has_table("studies"):
        return  # adopted: created before the migrations
    sqlite = op.get_bind().dialect.name == "sqlite"

    def text(length: int) -> sa.types.TypeEngine[str]:
        return sa.String(length) if sqlite else sa.Text()

    uid = sa.String(64)
    op.create_table(
        "studies",
        sa.Column("study_uid", uid, primary_key=True),
        sa.Column("state", text(9), nullable=False),
        sa.Column("patient_id", text(64)),
        sa.Column("patient_name", text(324)),
        sa.Column("study_date", text(8)),
        sa.Column("study_time", text(16)),
        sa.Column("accession_number", text(16)),
        sa.Column("study_description", text(64)),
        sa.Column("calling_ae", text(16)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("opened_at", sa.DateTime, nullable=False),
        sa.Column("last_received_at", sa.DateTime, nullable=False),
        sa.Column("completed_at", sa.DateTime),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_uid", uid, nullable=False, index=True),
        sa.Column("series_uid", uid, nullable=False),
        sa.Column("rule", text(128), nullable=False),
        sa.Column("action", text(16), nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.Column("destinations", sa.JSON, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("not_before", sa.DateTime),
        sa.Column("state", text(17), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("kind", text(32), nullable=False),
        sa.Column("study_uid", uid),
        sa.Column("job_id", sa.Integer),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("series_uid", uid, primary_key=True),
        sa.Column("study_uid", uid, sa.ForeignKey("studies.study_uid"), nullable=False, index=True),
        sa.Column("modality", text(16)),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", text(64)),
        sa.Column("body_part_examined", text(16)),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("source", text(8), nullable=False),
    )
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("kind", text(16), nullable=False),
        sa.Column("sop_instance_uid", uid, nullable=False),
        sa.Column("series_uid", uid, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", uid, nullable=False, unique=True),
        sa.Column("sop_class_uid", uid, nullable=False),
        sa.Column(
            "series_uid", uid, sa.ForeignKey("series.series_uid"), nullable=False, index=True
        ),
        sa.Column("study_uid", uid, nullable=False, index=True),
        sa.Column("instance_number", sa.Integer),
        sa.Column("transfer_syntax", uid, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger if not sqlite else sa.Integer, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("calling_ae", text(16)),
        sa.Column("called_ae", text(16)),
        sa.Column("source_address", text(64)),
        sa.Column("source", text(8), nullable=False),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("output_id", sa.Integer, sa.ForeignKey("outputs.id"), nullable=False, index=True),
        sa.Column("destination", text(64), nullable=False),
        sa.Column("state", text(7), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_status", sa.Text),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("commitment", text(16)),
        sa.Column("transaction_uid", uid, index=True),
    )
