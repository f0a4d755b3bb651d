"""Make a received instance durable and indexed, then say whether it is safe to acknowledge.

Used by the C-STORE handler; kept free of pynetdicom so it can be driven by other receivers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, Table, bindparam, select, text, update
from sqlalchemy.exc import IntegrityError

from airouter.core import metrics
from airouter.core.db import Event, Instance, Series, Store, Study, utcnow
from airouter.core.phi import REGISTRY
from airouter.core.spool import InvalidUID, check_uid, instance_path, place_durable, write_durable
from airouter.core.tags import (
    Unreadable,
    int_value,
    read,
    read_or_none,
    series_tags,
    text_value,
)
from airouter.core.vocab import Source, StoreStatus, StudyState
from scp.limits import check_inflation

log = logging.getLogger(__name__)

_INDEX_ATTEMPTS = 3

# The index statements, built once on the tables (not the ORM entities): SQLAlchemy compiles
# each once, and an instance's rows cost well under a millisecond instead of the ORM's 3.5.
_STUDIES, _SERIES = cast(Table, Study.__table__), cast(Table, Series.__table__)
_INSTANCES, _EVENTS = cast(Table, Instance.__table__), cast(Table, Event.__table__)
_INSTANCE_KNOWN = select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == bindparam("sop"))
# Locked (PostgreSQL): a node completing the study at this moment finishes first, and a late
# instance then sees the study complete and re-opens it.
_STUDY_STATE = (
    select(_STUDIES.c.state).where(_STUDIES.c.study_uid == bindparam("uid")).with_for_update()
)
_SERIES_KNOWN = select(_SERIES.c.series_uid).where(_SERIES.c.series_uid == bindparam("uid"))
_STUDY_UPDATE = update(_STUDIES).where(_STUDIES.c.study_uid == bindparam("uid"))
_STUDY_RECEIVING = (
    update(_STUDIES)
    .where(_STUDIES.c.study_uid == bindparam("uid"), _STUDIES.c.state == StudyState.RECEIVING)
    .values(interrupted_at=None, last_received_at=bindparam("now"))
)
# PostgreSQL, one round trip: the duplicate check, the touch of a study still receiving and
# the instance's row when its series exists (data-modifying CTEs all run, on one snapshot).
_PG_ONE_TRIP = text(
    """
WITH known AS (
    SELECT 1 FROM instances WHERE sop_instance_uid = CAST(:sop_instance_uid AS VARCHAR)
), touched AS (
    UPDATE studies SET interrupted_at = NULL,
        last_received_at = CAST(:received_at AS TIMESTAMP)
    WHERE study_uid = CAST(:study_uid AS VARCHAR) AND state = CAST(:receiving AS VARCHAR)
        AND NOT EXISTS (SELECT 1 FROM known)
    RETURNING 1
), inserted AS (
    INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid,
        instance_number, transfer_syntax, path, size, received_at, calling_ae, called_ae,
        source_address, source, received_by)
    SELECT CAST(:sop_instance_uid AS VARCHAR), CAST(:sop_class_uid AS VARCHAR),
        CAST(:series_uid AS VARCHAR), CAST(:study_uid AS VARCHAR),
        CAST(:instance_number AS INTEGER), CAST(:transfer_syntax AS VARCHAR),
        CAST(:path AS TEXT), CAST(:size AS BIGINT), CAST(:received_at AS TIMESTAMP),
        CAST(:calling_ae AS VARCHAR), CAST(:called_ae AS VARCHAR),
        CAST(:source_address AS VARCHAR), CAST(:source AS VARCHAR),
        CAST(:received_by AS VARCHAR)
    WHERE EXISTS (SELECT 1 FROM touched)
        AND EXISTS (SELECT 1 FROM series WHERE series_uid = CAST(:series_uid AS VARCHAR))
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM known), EXISTS (SELECT 1 FROM inserted)
"""
)
_RESENT = (
    update(_STUDIES)
    .where(_STUDIES.c.study_uid == bindparam("uid"), _STUDIES.c.interrupted_at.is_not(None))
    .values(interrupted_at=None)
)


@dataclass(frozen=True)
class Received:
    """What the receiver knows besides the data set."""

    transfer_syntax: str
    # The instance as a DICOM file (preamble, meta, data set as received): either the bytes or
    # a temporary file, which is moved into the spool (same filesystem: a rename, no copy).
    data: bytes | None = None
    path: Path | None = None
    command_sop_instance_uid: str | None = None
    command_sop_class_uid: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    source_address: str | None = None
    source: Source = Source.DIMSE
    # The fsync of ``path`` already begun (by the receiver, while it parsed the header): its
    # result is the file's size. None: ``store_instance`` does the fsync itself.
    synced: Future[int] | None = None


def count_outcome(
    status: StoreStatus, calling_ae: str | None, source: Source, size: int = 0
) -> None:
    """Count an instance stored (``size`` new bytes) or refused (Prometheus,
    ``airouter.core.metrics``)."""
    if status == StoreStatus.SUCCESS:
        instances, stored = metrics.received_counters(calling_ae, source.value)
        instances.inc()
        if size:
            stored.inc(size)
        return
    label = metrics.calling_ae_label(calling_ae)
    metrics.INSTANCES_REFUSED.labels(label, source.value, f"{int(status):04X}").inc()


@dataclass(frozen=True)
class Outcome:
    """What the ingest answers for one instance: the status to send and why."""

    status: StoreStatus
    reason: str = ""
    study_uid: str | None = None
    sop_instance_uid: str | None = None


class Ingest:
    """Spool + index; thread-safe (pynetdicom runs one handler thread per association)."""

    def __init__(
        self,
        store: Store,
        spool_root: Path,
        reserve_bytes: int = 0,
        max_inflated_bytes: int = 1 << 30,
        incoming_dir: Path | None = None,
        node_name: str | None = None,
        reidentify: Callable[[Dataset, Callable[[], Dataset], str | None], Dataset | None]
        | None = None,
    ) -> None:
        self.store = store
        # (header, read the whole data set, calling AE) -> the data set to store instead, or
        # None: what an off-site destination sends back, re-identified
        # (airouter.core.pseudonyms)
        self.reidentify = reidentify
        self.spool_root = spool_root
        # where instances are written while they arrive (on the spool's filesystem)
        self.incoming_dir = incoming_dir or spool_root / ".incoming"
        self.node_name = node_name  # recorded with each instance (several nodes, processes)
        self.reserve_bytes = reserve_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self._writer_lock = _WriterLock(store) if store.engine.dialect.name == "sqlite" else None
        self._count = threading.Lock()
        self._in_flight = 0  # instances of this process between their arrival and answer

    def check_limits(self, source: Path | bytes, transfer_syntax: str | None = None) -> None:
        """Raise :class:`scp.limits.TooLarge` for an instance that would exceed the limits
        (a deflated data set inflating beyond ``max_inflated_bytes``); call it before parsing.
        A known transfer syntax other than deflated costs nothing (no file is read)."""
        if transfer_syntax is None or transfer_syntax == DeflatedExplicitVRLittleEndian:
            check_inflation(source, self.max_inflated_bytes)

    def store_instance(
        self,
        ds: Dataset,
        received: Received,
        full_header: Callable[[], Dataset] | None = None,
    ) -> Outcome:
        """Persist and index one instance (see :meth:`_store_instance`), counted in the
        metrics."""
        if self.reidentify is not None:
            try:
                rewritten = self._reidentified(ds, received)
            except Exception as exc:  # refused, nothing stored under a pseudonym
                log.warning("refusing an instance: cannot re-identify it (%s)", exc)
                outcome = Outcome(StoreStatus.PROCESSING_FAILURE, f"cannot re-identify: {exc}")
                count_outcome(outcome.status, received.calling_ae, received.source)
                return outcome
            if rewritten is not None:
                ds, received = rewritten
                full_header = None
        size = 0
        try:
            size = received.path.stat().st_size if received.path else len(received.data or b"")
        except OSError as exc:  # the received file is gone: nothing to store
            log.error("cannot persist: %s", exc)
            outcome = Outcome(StoreStatus.OUT_OF_RESOURCES, f"cannot persist: {exc.strerror}")
        else:
            outcome = self._store_instance(ds, received, full_header, size)
        new = outcome.status == StoreStatus.SUCCESS and outcome.reason != "duplicate"
        count_outcome(outcome.status, received.calling_ae, received.source, size if new else 0)
        return outcome

    def _reidentified(self, ds: Dataset, received: Received) -> tuple[Dataset, Received] | None:
        """The data set and its bytes as they are stored when the hook re-identifies it."""
        assert self.reidentify is not None

        def whole() -> Dataset:
            source = received.path if received.path is not None else BytesIO(received.data or b"")
            return dcmread(source, force=True)

        mapped = self.reidentify(ds, whole, received.calling_ae)
        if mapped is None:
            return None
        buffer = BytesIO()
        mapped.save_as(buffer, enforce_file_format=True)
        command_uid = received.command_sop_instance_uid and str(mapped.SOPInstanceUID)
        return mapped, replace(
            received, data=buffer.getvalue(), path=None, synced=None,
            command_sop_instance_uid=command_uid,
        )  # fmt: skip

    def _store_instance(
        self,
        ds: Dataset,
        received: Received,
        full_header: Callable[[], Dataset] | None,
        size: int,
    ) -> Outcome:
        """Persist and index one instance. Never raises: every failure is a status.

        ``ds`` may hold only the attributes an instance of a series already indexed needs
        (``scp.header``); ``full_header`` then reads its whole header, for a new study or
        series. The index rows commit only once the file is durable in the spool (fsync,
        a hard link that never replaces a copy already there, fsync of the folder)."""
        try:
            ids = _identifiers(ds, received)
        except InvalidUID as exc:
            return Outcome(StoreStatus.CANNOT_UNDERSTAND, str(exc))
        study_uid, series_uid, sop_uid = ids[:3]
        REGISTRY.remember_dataset(ds)  # kept out of logs and events unless log_phi is on
        try:
            path = instance_path(self.spool_root, study_uid, series_uid, sop_uid)
            pending = 0 if received.path is not None else len(received.data or b"")
            if free_bytes(self.spool_root) - pending < self.reserve_bytes:
                log.warning("refusing %s: free space below the reserve", sop_uid)
                return Outcome(StoreStatus.OUT_OF_RESOURCES, "storage below the free-space reserve")
            arrival = _Arrival(ds, full_header, received, ids, path, size)
            attempts = _INDEX_ATTEMPTS
            with self._counted() as alone:
                while True:
                    try:
                        return self._store_once(arrival, alone)
                    except IntegrityError:
                        # Another node or association indexed this instance, or created its
                        # study or series, in the same moment: stored once, or try again
                        # (they exist now).
                        attempts -= 1
                        if self._known(sop_uid):
                            return Outcome(StoreStatus.SUCCESS, "duplicate", study_uid, sop_uid)
                        if not attempts:
                            raise
        except OSError as exc:
            log.error("cannot persist %s: %s", sop_uid, exc)
            return Outcome(StoreStatus.OUT_OF_RESOURCES, f"cannot persist: {exc.strerror}")
        except Exception as exc:  # a header the index cannot hold: refused, nothing left behind
            log.warning("refusing %s: cannot index it (%s)", sop_uid, type(exc).__name__)
            return Outcome(
                StoreStatus.CANNOT_UNDERSTAND, f"cannot index the data set ({type(exc).__name__})"
            )

    @contextmanager
    def _counted(self) -> Iterator[bool]:
        """Count this instance in flight; yields whether it is the only one in this
        process."""
        with self._count:
            self._in_flight += 1
            alone = self._in_flight == 1
        try:
            yield alone
        finally:
            with self._count:
                self._in_flight -= 1

    def _store_once(self, a: _Arrival, alone: bool = True) -> Outcome:
        """Durable in the spool under a name no other copy can take (the first copy of an
        instance stays: the filesystem decides between associations, processes and nodes),
        and indexed in a transaction that commits only after that.

        On SQLite an instance alone in its process runs its index statements while its
        fsync does, in a transaction that commits after it (one association: 0.8 ms less an
        instance); while others are in flight it places its file first and holds the one
        writer's lock only for its statements, so that the associations' fsyncs overlap
        instead of taking turns under the lock. On PostgreSQL, always the latter."""
        study_uid, _, sop_uid = a.ids[:3]
        if self._writer_lock is not None and alone:
            # SQLite, alone in this process: the statements run while the data set's fsync
            # does (a new study or series, or an event to write, takes the path below)
            with self._writer():
                quick = self._sqlite_rows(a, place=True)
            if quick is not None:
                return quick
        # a round trip (PostgreSQL) or the writer's lock (SQLite) costs more than the work:
        # place the file, then index it
        if not self._place(a):
            # indexed already, or a copy another node placed a moment ago (it indexes it),
            # or a file a crash left without its row (indexed here, as it is)
            a.size = a.path.stat().st_size
            if self._index_now(a):
                log.warning("spool file of %s lacked its index row: indexed", sop_uid)
                return self._stored(a)
            return self._duplicate(study_uid, sop_uid)
        try:
            if self._writer_lock is not None:
                with self._writer():
                    quick = self._sqlite_rows(a, place=False)
                if quick is not None:
                    return quick
            known, stored = self._one_trip(a)
            if not (known or stored):
                known = not self._index_now(a)
        except IntegrityError:
            raise  # indexed by another at the same moment: the file is the instance's
        except BaseException:
            a.path.unlink(missing_ok=True)  # ours (placed just now): its index failed
            raise
        return self._duplicate(study_uid, sop_uid) if known else self._stored(a)

    def _sqlite_rows(self, a: _Arrival, place: bool) -> Outcome | None:
        """SQLite, the common case (the study receiving, the series indexed), on the DBAPI
        connection: SQLAlchemy's statement machinery took 0.85 ms of the 1.0 an instance's
        rows cost. With ``place`` the file is placed (its fsync awaited) before the commit.
        None when it is not the common case: nothing was written, nothing placed. The
        caller holds the writer's lock."""
        study_uid, series_uid, sop_uid, _, filled = a.ids
        if filled:
            return None  # an event row too: the full path
        now = utcnow()
        raw = self.store.engine.raw_connection()
        placed = False
        try:
            cur = raw.cursor()
            if cur.execute(_RAW.known, (sop_uid,)).fetchone() is not None:
                return self._duplicate(study_uid, sop_uid)
            cur.execute(_RAW.touch, _RAW.touch_values(study_uid, now))
            if cur.rowcount != 1 or cur.execute(_RAW.series, (series_uid,)).fetchone() is None:
                raw.rollback()
                return None
            cur.execute(_RAW.insert, _RAW.instance_values(a.instance_row(self.node_name, now)))
            if place:
                placed = self._place(a)
                if not placed:  # no row, and the writer's lock is ours: a file a crash left
                    log.warning("spool file of %s lacked its index row: indexed", sop_uid)
                    cur.execute(_RAW.size, (a.path.stat().st_size, sop_uid))
            raw.commit()
        except sqlite3.IntegrityError as exc:
            raw.rollback()
            raise IntegrityError(_RAW.insert, None, exc) from exc  # as SQLAlchemy's would
        except BaseException:
            raw.rollback()
            if placed:
                a.path.unlink(missing_ok=True)  # ours (placed just now): its commit failed
            raise
        finally:
            raw.close()  # back to the pool
        return self._stored(a)

    @staticmethod
    def _place(a: _Arrival) -> bool:
        received, path = a.received, a.path
        if received.path is not None:
            if received.synced is not None:
                received.synced.result()  # begun while the header was read
            return place_durable(received.path, path, synced=received.synced is not None)
        assert received.data is not None
        return write_durable(path, received.data, replace=False)

    def _index_now(self, a: _Arrival) -> bool:
        """The index rows in a transaction of their own; False when the instance was
        indexed already."""
        with self._writer(), self.store.engine.begin() as conn:
            if conn.execute(_INSTANCE_KNOWN, {"sop": a.ids[2]}).first() is not None:
                return False
            self._rows(conn, a)
        return True

    @staticmethod
    def _stored(a: _Arrival) -> Outcome:
        return Outcome(StoreStatus.SUCCESS, "", a.ids[0], a.ids[2])

    def _duplicate(self, study_uid: str, sop_uid: str) -> Outcome:
        log.info("duplicate SOP Instance UID %s: already stored", sop_uid)
        with self.store.engine.begin() as conn:  # a resend after a crash: see _upsert_study
            conn.execute(_RESENT, {"uid": study_uid, "last_received_at": utcnow()})
        return Outcome(StoreStatus.SUCCESS, "duplicate", study_uid, sop_uid)

    def _one_trip(self, a: _Arrival) -> tuple[bool, bool]:
        """PostgreSQL: the common case in one statement, committed on its own (a round trip
        costs more than the work): (already indexed, indexed now). (False, False) elsewhere,
        or when the study is not receiving or the series is new: a transaction then."""
        if self.store.engine.dialect.name != "postgresql" or a.ids[4]:
            return False, False
        row = a.instance_row(self.node_name, utcnow())
        row["source"] = a.received.source.name
        row["receiving"] = StudyState.RECEIVING.name
        with self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            known, stored = c.execute(_PG_ONE_TRIP, row).one()
        return bool(known), bool(stored)

    def _writer(self) -> AbstractContextManager[Any]:
        """SQLite has one writer: the index transactions take turns (:class:`_WriterLock`);
        PostgreSQL's run side by side."""
        return self._writer_lock if self._writer_lock is not None else nullcontext()

    def _known(self, sop_uid: str) -> bool:
        with self.store.engine.connect() as conn:
            return conn.execute(_INSTANCE_KNOWN, {"sop": sop_uid}).first() is not None

    def reconcile(self, since: datetime | None) -> int:
        """Index the spool files the index lacks: instances whose index commit a power loss
        took (commits do not wait for their own fsync unless the store says so; every one
        before the last durability mark is on disk). Only series folders changed after
        ``since`` are looked at (all of them when None). Returns how many were indexed."""
        if not self.spool_root.is_dir():
            return 0
        threshold = since.replace(tzinfo=UTC).timestamp() if since is not None else None
        indexed = 0
        for study_dir in self.spool_root.iterdir():
            if not study_dir.is_dir() or study_dir.name.startswith("."):
                continue
            for series_dir in study_dir.iterdir():
                if series_dir.is_dir() and (
                    threshold is None or series_dir.stat().st_mtime >= threshold
                ):
                    indexed += self._reconcile_series(series_dir)
        if indexed:
            self.store.record("index_rebuilt", {"instances": indexed})
            log.warning("%d instances in the spool lacked their index row: indexed", indexed)
        return indexed

    def _reconcile_series(self, series_dir: Path) -> int:
        with self.store.session() as s:
            rows = s.scalars(select(Instance.path).where(Instance.series_uid == series_dir.name))
            known = set(rows)
        indexed = 0
        for path in sorted(series_dir.glob("*.dcm")):
            if str(path) in known or path.name.startswith("."):
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                meta = ds.file_meta
                received = Received(  # no command: the file meta stands in
                    transfer_syntax=str(meta.TransferSyntaxUID),
                    command_sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", ""))
                    or None,
                    command_sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")) or None,
                    source=Source.SPOOL,
                )
                ids = _identifiers(ds, received)
                if instance_path(self.spool_root, *ids[:3]) != path:
                    log.warning("spool file %s is not where its UIDs say: left", path.name)
                    continue
                arrival = _Arrival(ds, None, received, ids, path, path.stat().st_size)
                with self._writer(), self.store.engine.begin() as conn:
                    self._rows(conn, arrival)
                indexed += 1
            except IntegrityError:
                continue  # indexed meanwhile (by another node)
            except Exception as exc:
                log.warning("spool file %s cannot be indexed: %s", path.name, exc)
        return indexed

    def _rows(self, conn: Connection, a: _Arrival) -> None:
        """The index rows of one instance (its study and series if new) in ``conn``'s
        transaction."""
        study_uid, _, sop_uid, _, filled = a.ids
        now = utcnow()
        _upsert_study(conn, a, now)
        _upsert_series(conn, a)
        conn.execute(_INSTANCES.insert(), a.instance_row(self.node_name, now))
        if filled:
            conn.execute(
                _EVENTS.insert(),
                {
                    "kind": "identifiers_from_command",
                    "study_uid": study_uid,
                    "detail": f"{sop_uid}: the data set has no {' or '.join(filled)}; "
                    "the C-STORE request's (or the file meta's) is used",
                },
            )


@dataclass
class _Arrival:
    """One instance on its way into the index: its header as far as it was read (all of it
    once a new study or series needs it), how it came, its UIDs (study, series, instance,
    class, and which the data set lacked), where it goes and its size."""

    ds: Dataset
    full_header: Callable[[], Dataset] | None
    received: Received
    ids: tuple[str, str, str, str, list[str]]
    path: Path
    size: int

    def whole(self) -> Dataset:
        """The whole header (read now if only the index's attributes were)."""
        if self.full_header is not None:
            self.ds, self.full_header = self.full_header(), None
        return self.ds

    def instance_row(self, node_name: str | None, now: datetime) -> dict[str, Any]:
        """The instance's index row."""
        study_uid, series_uid, sop_uid, sop_class, _ = self.ids
        received = self.received
        return {
            "sop_instance_uid": sop_uid,
            "sop_class_uid": sop_class,
            "series_uid": series_uid,
            "study_uid": study_uid,
            "instance_number": int_value(read_or_none(self.ds, "InstanceNumber")),
            "transfer_syntax": received.transfer_syntax,
            "path": str(self.path),
            "size": self.size,
            "received_at": now,
            "calling_ae": received.calling_ae,
            "called_ae": received.called_ae,
            "source_address": received.source_address,
            "source": received.source,
            "received_by": node_name,
        }


class _RawStatements:
    """The common case's index statements as SQLite text, with the values converted as the
    columns' SQLAlchemy types convert them (dates as text, enums by name)."""

    def __init__(self) -> None:
        from sqlalchemy.dialects import sqlite as dialect

        d = dialect.dialect()
        self.columns = [c.name for c in _INSTANCES.columns if c.name != "id"]
        self._processors = [_INSTANCES.c[c].type.bind_processor(d) for c in self.columns]
        self._date = _STUDIES.c.last_received_at.type.bind_processor(d)
        state = _STUDIES.c.state.type.bind_processor(d)
        self._receiving = state(StudyState.RECEIVING) if state else StudyState.RECEIVING.name
        self.known = "SELECT id FROM instances WHERE sop_instance_uid = ?"
        self.touch = (
            "UPDATE studies SET interrupted_at = NULL, last_received_at = ? "
            "WHERE study_uid = ? AND state = ?"
        )
        self.series = "SELECT 1 FROM series WHERE series_uid = ?"
        self.insert = (
            f"INSERT INTO instances ({', '.join(self.columns)}) "
            f"VALUES ({', '.join('?' * len(self.columns))})"
        )
        self.size = "UPDATE instances SET size = ? WHERE sop_instance_uid = ?"

    def touch_values(self, study_uid: str, now: datetime) -> tuple[Any, ...]:
        """The parameters of :attr:`touch`."""
        return (self._date(now) if self._date else now, study_uid, self._receiving)

    def instance_values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """The parameters of :attr:`insert` for an instance row."""
        return tuple(
            p(row[c]) if p else row[c] for c, p in zip(self.columns, self._processors, strict=True)
        )


_RAW = _RawStatements()


class _WriterLock:
    """The turns of SQLite's one writer among the ingests of the node's processes: a thread
    lock within a process, an ``flock`` of a file beside the database between processes. A
    waiter wakes the moment the lock is free, where SQLite's busy handler sleeps 1 to 100 ms
    between tries (two processes taking turns spent most of their time asleep). The node's
    other writers (completion, jobs) still meet the ingest in SQLite's busy handler."""

    def __init__(self, store: Store) -> None:
        self._thread = threading.Lock()
        database = store.engine.url.database
        self._fd: int | None = None
        if database and database != ":memory:" and not database.startswith("file:"):
            self._fd = os.open(f"{database}.ingest-lock", os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        self._thread.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread.release()
                raise

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread.release()


def free_bytes(path: Path) -> int:
    """Free space for unprivileged writers on the filesystem holding ``path``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _identifiers(ds: Dataset, received: Received) -> tuple[str, str, str, str, list[str]]:
    """Study, series, SOP instance and SOP class UIDs, and which of the last two the data set
    lacked (the index holds the request's: the senders put them back into what they send).

    The SOP Instance / Class UID fall back to the C-STORE command (the Affected SOP Instance
    UID identifies the instance, PS3.7 9.1.1), or for STOW to the file meta, when the data set
    has them empty; the study and series UIDs have no such fallback. A C-STORE whose command and
    data set name different instances is refused; a STOW part's file meta that disagrees with
    its data set is common and harmless (the data set wins).
    """
    own_sop = _uid_text(ds, "SOPInstanceUID")
    own_class = _uid_text(ds, "SOPClassUID")
    sop_uid = own_sop or received.command_sop_instance_uid or ""
    sop_class = own_class or received.command_sop_class_uid or ""
    filled = [k for k, own in (("SOPClassUID", own_class), ("SOPInstanceUID", own_sop)) if not own]
    cmd_uid = received.command_sop_instance_uid
    if cmd_uid and own_sop and own_sop != cmd_uid and received.source is Source.DIMSE:
        raise InvalidUID("SOPInstanceUID in the data set differs from the C-STORE request")
    return (
        check_uid(_uid_text(ds, "StudyInstanceUID"), "StudyInstanceUID"),
        check_uid(_uid_text(ds, "SeriesInstanceUID"), "SeriesInstanceUID"),
        check_uid(sop_uid, "SOPInstanceUID"),
        check_uid(sop_class, "SOPClassUID"),
        filled,
    )


def _uid_text(ds: Dataset, keyword: str) -> str:
    """A UID attribute as text ("" when absent); unreadable is refused naming the keyword."""
    try:
        value = read(ds, keyword, "")
    except Unreadable as exc:
        raise InvalidUID(str(exc)) from exc
    return str(value or "")


def _upsert_study(conn: Connection, a: _Arrival, now: datetime) -> None:
    # The common case, one statement: a study still receiving. On PostgreSQL the update
    # locks the row: a node completing the study at this moment finishes first, and this
    # late instance then sees it complete and re-opens it.
    study_uid = a.ids[0]
    touched = conn.execute(_STUDY_RECEIVING, {"uid": study_uid, "now": now})
    if touched.rowcount:
        return
    state = conn.execute(_STUDY_STATE, {"uid": study_uid}).scalar()
    if state is None:
        ds = a.whole()
        conn.execute(
            _STUDIES.insert(),
            {
                "study_uid": study_uid,
                "state": StudyState.RECEIVING,
                "patient_id": text_value(ds, "PatientID"),
                "patient_name": text_value(ds, "PatientName"),
                "study_date": text_value(ds, "StudyDate"),
                "study_time": text_value(ds, "StudyTime"),
                "accession_number": text_value(ds, "AccessionNumber"),
                "study_description": text_value(ds, "StudyDescription"),
                "calling_ae": a.received.calling_ae,
                "created_at": now,
                "opened_at": now,
                "last_received_at": now,
            },
        )
        return
    # Late arrival after routing: the study re-opens and will be routed again (and an
    # instance for a study a crash cut off: its sender is sending again, and the quiet
    # period after it completes the study as usual).
    conn.execute(
        _STUDY_UPDATE,
        {
            "uid": study_uid,
            "state": StudyState.RECEIVING,
            "opened_at": now,
            "interrupted_at": None,
            "last_received_at": now,
        },
    )
    conn.execute(_EVENTS.insert(), {"kind": "study_reopened", "study_uid": study_uid})


def _upsert_series(conn: Connection, a: _Arrival) -> None:
    study_uid, series_uid = a.ids[:2]
    if conn.execute(_SERIES_KNOWN, {"uid": series_uid}).first() is not None:
        return
    ds = a.whole()
    conn.execute(
        _SERIES.insert(),
        {
            "series_uid": series_uid,
            "study_uid": study_uid,
            "modality": text_value(ds, "Modality"),
            "series_number": int_value(read_or_none(ds, "SeriesNumber")),
            "series_description": text_value(ds, "SeriesDescription"),
            "body_part_examined": text_value(ds, "BodyPartExamined"),
            "tags": series_tags(ds),
            "source": a.received.source,
        },
    )
