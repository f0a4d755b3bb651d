"""The node's state store: instances, series, studies, jobs, outputs, deliveries, events.

SQLAlchemy 2 on SQLite in WAL mode by default (PostgreSQL when scaled out). Every stage reads
from and writes to these tables, so any stage can crash and resume.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    attributes,
    mapped_column,
    relationship,
    sessionmaker,
)

from airouter.core.phi import REGISTRY
from airouter.core.vocab import (
    Action,
    CommitmentState,
    DeliveryState,
    JobState,
    Notify,
    OutputKind,
    Role,
    SegType,
    Source,
    StudyState,
)


def utcnow() -> datetime:
    """Now in UTC, naive (what the columns hold)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _by_value(kind: type[enum.Enum], length: int = 32) -> Enum:
    """An enum column that stores the members' values (what these columns held as text
    before they became enums, so existing rows read back unchanged)."""
    return Enum(
        kind, values_callable=lambda e: [m.value for m in e], length=length, native_enum=False
    )


def _by_name(kind: type[enum.Enum]) -> Enum:
    """An enum column that stores the members' names, as text (no native enum type)."""
    return Enum(kind, native_enum=False, length=32)


class Base(DeclarativeBase):
    """The tables of the state store."""


class Study(Base):
    """A study: the tags QIDO-RS answers with, where it came from, and its completion timers."""

    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[StudyState] = mapped_column(_by_name(StudyState), default=StudyState.RECEIVING)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    opened_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # (re-)opened
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Still receiving when the node stopped: the quiet period does not complete it (its sender
    # may be slow to resend); its announced counts, required series or deadline do.
    interrupted_at: Mapped[datetime | None] = mapped_column(DateTime)


class Series(Base):
    """A series of a study, received or produced, with the tags the rules match on."""

    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    # Denormalised tags the rules need, as DICOM keyword -> value (first instance seen).
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[Source] = mapped_column(_by_name(Source), default=Source.DIMSE)


class Instance(Base):
    """One stored instance: where its file lies and how it arrived."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    source_address: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[Source] = mapped_column(_by_name(Source), default=Source.DIMSE)
    received_by: Mapped[str | None] = mapped_column(String(128))  # the node's name


class Job(Base):
    """One rule applied to one series of a study: state, attempts, timings, results version."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(128))
    action: Mapped[Action] = mapped_column(_by_value(Action, 16), default=Action.RUN)
    models: Mapped[list[str]] = mapped_column(JSON)
    outputs: Mapped[list[str]] = mapped_column(JSON)
    destinations: Mapped[list[str]] = mapped_column(JSON)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)  # of the series, at routing
    version: Mapped[int] = mapped_column(Integer, default=1)  # 2, 3 ...: amended results
    priority: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime)  # off-hours work waits
    state: Mapped[JobState] = mapped_column(_by_name(JobState), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    seg_type: Mapped[SegType | None] = mapped_column(_by_value(SegType, 16))  # the rule's SEG
    # Release 0.1 kept seg_type here (a NOT NULL column in its databases); read for its jobs.
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    retry_of: Mapped[int | None] = mapped_column(Integer)  # the failed job this one retries
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # While in flight: the node running it ("name/instance"), until when (renewed while that
    # node lives; once past, any node takes the job over).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)


class Output(Base):
    """An object a job sends: one it produced (SEG, SR ...) or a received instance it forwards."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[OutputKind] = mapped_column(_by_value(OutputKind, 16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)


class Delivery(Base):
    """One (output, destination) of the outbox, with the destination's last answer."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _by_name(DeliveryState), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime | None] = mapped_column(DateTime, default=utcnow)  # in outbox
    # Storage commitment (DICOM destinations that offer it): requested -> committed | failed.
    commitment: Mapped[CommitmentState | None] = mapped_column(_by_value(CommitmentState, 16))
    transaction_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    # While SENDING: the node sending it and until when (as for jobs).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)


class Notification(Base):
    """Something receivers are told about a job (:class:`Notify`): written in the transaction
    that moves the job (see :func:`_note_job_states`), whatever the receivers configured then;
    the dispatcher adds one :class:`NotificationDelivery` per receiver that wants it."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    event: Mapped[Notify] = mapped_column(_by_value(Notify, 16))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # the job's version and error when it happened (a retry makes a later one)
    version: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(Text)
    expanded: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    job: Mapped[Job] = relationship(lazy="raise")  # set when written (the job may be new)


class NotificationDelivery(Base):
    """One (notification, receiver), retried like a delivery. A node claims it by moving
    ``next_attempt_at`` past its lease: a node that dies mid-send leaves it due again."""

    __tablename__ = "notification_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), index=True)
    receiver: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _by_name(DeliveryState), default=DeliveryState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))


class Evaluation(Base):
    """One structure of a result compared with the clinician's version of it (a structure
    set sent back to the node), with the subgroup the case belongs to."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)  # the evaluation's
    evaluated_job_id: Mapped[int] = mapped_column(Integer, index=True)  # the result's
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    reference_uid: Mapped[str] = mapped_column(String(64))  # the returned object's SOP UID
    structure: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    dice: Mapped[float] = mapped_column()
    hd95_mm: Mapped[float | None] = mapped_column()
    surface_dice: Mapped[float | None] = mapped_column()
    volume_ml: Mapped[float] = mapped_column()
    reference_volume_ml: Mapped[float] = mapped_column()
    # subgroup: dimension -> value (sex, age_band, manufacturer, scanner, site, thickness)
    subgroup: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Pseudonym(Base):
    """A UID replaced in a copy sent de-identified to a destination, and the original: what
    comes back referencing the pseudonym is mapped to the original before it goes anywhere."""

    __tablename__ = "pseudonyms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym_uid: Mapped[str] = mapped_column(String(64), unique=True)
    original_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)  # the original study
    destination: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    """Append-only audit trail: what arrived, which rule matched, what was delivered."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str | None] = mapped_column(String(64))  # the user who asked, if one did


class User(Base):
    """Someone who may use the HTTP server: a role, and an argon2 hash of the password."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_by_value(Role, 16))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token of a user, for machines and the CLI: only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class WebSession(Base):
    """A signed-in browser: the SHA-256 of its cookie, its CSRF token, when it ends."""

    __tablename__ = "web_sessions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Node(Base):
    """A node working on this database: who it is and when it last said it was alive."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    instance: Mapped[str] = mapped_column(String(32))  # this run of it (a restart: a new one)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Transfer(Base):
    """A study a node is receiving now: one row per (association or STOW request, study),
    removed when the association ends; a dead node's rows expire with its lease."""

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)  # the node's lease owner
    conn: Mapped[str] = mapped_column(String(32))  # the association (or request) in that node
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_until: Mapped[datetime] = mapped_column(DateTime)


class Mark(Base):
    """A durability mark: every index commit before ``at`` is on disk."""

    __tablename__ = "marks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime)


class Store:
    """Engine and session factory; one per process."""

    def __init__(self, url: str, sync_commits: bool = True) -> None:
        """``sync_commits`` False: a commit does not wait for its own fsync (SQLite
        synchronous=NORMAL in WAL mode, PostgreSQL synchronous_commit=off); the database stays
        consistent after a crash, and a power loss may lose the last commits, which
        :meth:`mark_durable` bounds (the ingest rebuilds them from the spool)."""
        self.engine: Engine = create_engine(url, connect_args=_connect_args(url))
        self.sync_commits = sync_commits
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas(sync_commits))
        elif not sync_commits:
            event.listen(self.engine, "connect", _postgres_async_commit)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _note_job_states)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as session:
            yield session

    def mark_durable(self, name: str) -> None:
        """Record now as mark ``name`` in a commit that waits for its fsync, which makes every
        earlier commit durable too (the log is written in order)."""
        at = utcnow()
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as conn:
            if sqlite:  # outside a transaction (pysqlite begins one before the UPDATE)
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()
            else:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO on")
            row = update(Mark).where(Mark.name == name).values(at=at)
            if not conn.execute(row).rowcount:
                conn.execute(insert(Mark).values(name=name, at=at))
            conn.commit()
            if sqlite and not self.sync_commits:
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                conn.commit()

    def durable_mark(self, name: str) -> datetime | None:
        """When mark ``name`` was last recorded (None: never)."""
        with self.session() as s:
            row = s.get(Mark, name)
            return row.at if row is not None else None

    def record(self, kind: str, detail: dict[str, Any] | str = "", **where: Any) -> None:
        """Append an audit event (no PHI: UIDs, states and reasons only; a value that slips
        into a reason is redacted unless ``log_phi`` is on)."""
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
        text = REGISTRY.redact(text)
        with self.session() as s:
            s.add(Event(kind=kind, detail=text, **where))


def instance_counts(s: Session, study_uid: str) -> dict[str, int]:
    """Series Instance UID -> number of indexed instances, for one study."""
    rows = s.execute(
        select(Instance.series_uid, func.count(Instance.id))
        .where(Instance.study_uid == study_uid)
        .group_by(Instance.series_uid)
    ).all()
    return {str(uid): int(n) for uid, n in rows}


def jobs_by_state(s: Session) -> dict[JobState, int]:
    """How many jobs are in each state (states without any left out)."""
    rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {JobState(state): int(n) for state, n in rows}


def queued_by_priority(s: Session) -> dict[int, int]:
    """How many jobs are queued, by priority rank (``Priority.rank``)."""
    rows = s.execute(
        select(Job.priority, func.count())
        .where(Job.state == JobState.QUEUED)
        .group_by(Job.priority)
    ).all()
    return {int(rank): int(n) for rank, n in rows}


# The job states receivers are told about (STAT findings are added by the pipeline).
_NOTIFIED = {
    JobState.DONE: Notify.DONE,
    JobState.FAILED: Notify.FAILED,
    JobState.AWAITING_REVIEW: Notify.AWAITING_REVIEW,
    JobState.REJECTED: Notify.REJECTED,
    JobState.CANCELLED: Notify.CANCELLED,
}


def _note_job_states(session: Session, _context: Any, _instances: Any) -> None:
    """Before each flush: a job whose state became one receivers are told about gets a
    :class:`Notification` in the same transaction, wherever in the node it moved (the
    pipeline, the outbox, a reviewer, a cancel). Bulk UPDATEs of jobs (claims, leases)
    never move a job to such a state."""
    for obj in list(session.new) + list(session.dirty):
        if not isinstance(obj, Job):
            continue
        added = attributes.get_history(obj, "state").added
        if not added or (event := _NOTIFIED.get(added[-1])) is None:
            continue
        session.add(Notification(job=obj, event=event, version=obj.version or 1, error=obj.error))


MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x41495254  # the PostgreSQL advisory lock nodes take to migrate, one at a time


def migrate(engine: Engine) -> None:
    """Bring the database to the current schema (Alembic, ``airouter/core/migrations``): an
    empty one is created, one from an earlier release is upgraded in place. On PostgreSQL
    the nodes starting together migrate one at a time (an advisory lock)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def _connect_args(url: str) -> dict[str, Any]:
    return {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}


def _sqlite_pragmas(sync_commits: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit fsyncs the log; NORMAL: the log is fsynced at checkpoints (and by
        # Store.mark_durable), a crash of the process loses nothing, a power loss the last
        # commits.
        cur.execute(f"PRAGMA synchronous={'FULL' if sync_commits else 'NORMAL'}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return on_connect


def _postgres_async_commit(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET synchronous_commit TO off")
    cur.close()
    dbapi_conn.commit()
