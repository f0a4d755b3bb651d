"""Results go out: the node's archive, then a durable outbox per (object, destination).

Every object a job writes is stored in the archive (indexed, served by DICOMweb) and gets one
delivery row per destination. Deliveries are sent per destination kind (:mod:`dispatch.senders`:
C-STORE on one association, STOW-RS, Orthanc REST, a folder); the state recorded is the
destination's real answer, and failures are retried with exponential backoff until
``dispatch_max_attempts``, then marked dead.
"""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from airouter.core import metrics
from airouter.core.db import (
    Delivery,
    Event,
    Instance,
    Job,
    Output,
    Pseudonym,
    Series,
    Store,
    Study,
    utcnow,
)
from airouter.core.leases import Identity
from airouter.core.phi import REGISTRY
from airouter.core.settings import (
    RETURN_TO_SENDER,
    DeidentifySettings,
    DicomNode,
    DispatchSettings,
)
from airouter.core.spool import instance_path, write_durable
from airouter.core.vocab import (
    CommitmentState,
    DeliveryState,
    JobState,
    OutputKind,
    Review,
    RunMode,
    Source,
)
from dispatch.deidentify import burned_in_refusal, deidentify
from dispatch.senders import send

log = logging.getLogger(__name__)


class Outbox:
    """The node's archive and the outbox: what a job produced is stored, indexed and queued
    for each of its destinations, in the caller's transaction."""

    def __init__(self, archive_dir: Path, settings: DispatchSettings) -> None:
        self.archive_dir = archive_dir
        self.settings = settings

    def archive(
        self,
        s: Session,
        job: Job,
        kind: OutputKind,
        ds: Dataset,
        destinations: Sequence[str] | None = None,
    ) -> Output:
        """Write a produced object to the archive; index it and queue its deliveries in ``s``
        (to ``destinations`` of the job only, when given: another template's objects go to
        the others)."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        path = instance_path(
            self.archive_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        write_durable(path, data)
        if s.get(Series, ds.SeriesInstanceUID) is None:
            s.add(
                Series(
                    series_uid=ds.SeriesInstanceUID,
                    study_uid=ds.StudyInstanceUID,
                    modality=ds.Modality,
                    series_number=int(ds.SeriesNumber),
                    series_description=str(ds.get("SeriesDescription", "")),
                    tags={"Modality": ds.Modality},
                    source=Source.PRODUCED,
                )
            )
            s.flush()
        s.add(
            Instance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_uid=ds.SeriesInstanceUID,
                study_uid=ds.StudyInstanceUID,
                instance_number=int(ds.get("InstanceNumber", 1) or 1),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                path=str(path),
                size=len(data),
                source=Source.PRODUCED,
            )
        )
        output = Output(
            job_id=job.id,
            kind=kind,
            sop_instance_uid=ds.SOPInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            path=str(path),
        )
        s.add(output)
        s.flush()
        self.add_deliveries(s, job, output, destinations)
        return output

    def forward(self, s: Session, job: Job) -> int:
        """Queue the job's series as received (its instances become the job's outputs);
        returns how many instances."""
        instances = s.scalars(
            select(Instance).where(Instance.series_uid == job.series_uid).order_by(Instance.id)
        ).all()
        for inst in instances:
            output = Output(
                job_id=job.id,
                kind=OutputKind.ORIGINAL,
                sop_instance_uid=inst.sop_instance_uid,
                series_uid=inst.series_uid,
                path=inst.path,
            )
            s.add(output)
            s.flush()
            self.add_deliveries(s, job, output)
        return len(instances)

    def _sender(self, s: Session, job: Job) -> str | None:
        """The configured DICOM destination whose AE title is the study's calling AE."""
        study = s.get(Study, job.study_uid)
        calling = study.calling_ae if study is not None else None
        for name, node in self.settings.destinations.items():
            if isinstance(node, DicomNode) and calling and node.ae_title == calling.strip():
                return name
        return None

    def _is_test(self, s: Session, job: Job, destination: str) -> bool:
        """Whether ``destination`` (or the sender it stands for) is marked ``test: true``."""
        name = self._sender(s, job) if destination == RETURN_TO_SENDER else destination
        node = self.settings.destinations.get(name or "")
        return bool(node is not None and node.test)

    def shadow_withheld(self, s: Session, job: Job) -> list[str]:
        """The destinations a shadow run of ``job`` sends nothing to (not marked test)."""
        return [d for d in job.destinations if not self._is_test(s, job, d)]

    def add_deliveries(
        self, s: Session, job: Job, output: Output, destinations: Sequence[str] | None = None
    ) -> None:
        """One outbox entry per destination of the job (of ``destinations``, when given);
        "@sender" becomes the configured DICOM
        destination whose AE title is the study's calling AE, or a dead entry saying why not.

        A job whose rule wants a review queues its entries awaiting review (nothing leaves
        until someone approves). A shadow run's entries go only to destinations marked
        ``test``; the others are never queued (the job's events say which)."""
        options = job.options or {}
        held = options.get("review") == Review.REQUIRED
        state = DeliveryState.AWAITING_REVIEW if held else DeliveryState.PENDING
        for destination in job.destinations if destinations is None else destinations:
            if options.get("mode") == RunMode.SHADOW and not self._is_test(s, job, destination):
                continue
            if destination != RETURN_TO_SENDER:
                node = self.settings.destinations.get(destination)
                if node is not None and node.deidentify is not None:
                    self._add_deidentified(s, job, output, destination, node.deidentify, state)
                    continue
                s.add(Delivery(output_id=output.id, destination=destination, state=state))
                continue
            name = self._sender(s, job)
            if name is not None:
                s.add(Delivery(output_id=output.id, destination=name, state=state))
            else:
                study = s.get(Study, job.study_uid)
                calling = study.calling_ae if study is not None else None
                s.add(
                    Delivery(
                        output_id=output.id,
                        destination=f"{RETURN_TO_SENDER}:{calling or '?'}",
                        state=DeliveryState.DEAD,
                        last_status=(
                            f"return to sender: calling AE {calling!r} is not a configured "
                            "DICOM destination"
                        ),
                    )
                )

    def _add_deidentified(
        self,
        s: Session,
        job: Job,
        output: Output,
        destination: str,
        settings: DeidentifySettings,
        state: DeliveryState,
    ) -> None:
        """Queue a de-identified copy of ``output`` for an off-site ``destination``
        (:mod:`dispatch.deidentify`): written durable beside the archive, its UIDs' originals
        kept in the database (a seed per destination: two off-site systems cannot link their
        copies), or a dead entry saying why the series may not leave."""
        ds = dcmread(output.path)
        allowed = bool((job.options or {}).get("allow_burned_in"))
        refusal = None if allowed else burned_in_refusal(ds, settings)
        if refusal is not None:
            log.warning(
                "job %s: %s of series %s not sent to %s: %s",
                job.id, output.sop_instance_uid, output.series_uid, destination, refusal,
            )  # fmt: skip
            s.add(
                Delivery(
                    output_id=output.id,
                    destination=destination,
                    state=DeliveryState.DEAD,
                    last_status=f"not sent de-identified: {refusal}",
                )
            )
            return
        seeded = settings.model_copy(update={"seed": f"{settings.seed}:{destination}"})
        copy, pairs = deidentify(ds, seeded, produced=output.kind is not OutputKind.ORIGINAL)
        buffer = io.BytesIO()
        copy.save_as(buffer, enforce_file_format=True)
        path = instance_path(
            self.archive_dir.parent / "deidentified" / destination,
            copy.StudyInstanceUID,
            copy.SeriesInstanceUID,
            copy.SOPInstanceUID,
        )
        write_durable(path, buffer.getvalue())
        twin = Output(
            job_id=job.id,
            kind=output.kind,
            sop_instance_uid=copy.SOPInstanceUID,
            series_uid=copy.SeriesInstanceUID,
            path=str(path),
        )
        s.add(twin)
        s.flush()
        if pairs:
            now = utcnow()
            rows = [
                {
                    "pseudonym_uid": pseudonym,
                    "original_uid": original,
                    "study_uid": str(ds.StudyInstanceUID),
                    "destination": destination,
                    "created_at": now,
                }
                for original, pseudonym in pairs
            ]
            insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
            s.execute(
                insert(Pseudonym)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["pseudonym_uid"])
            )
        s.add(Delivery(output_id=twin.id, destination=destination, state=state))


def _deidentified_for(path: str, destination: str) -> bool:
    """Whether ``path`` is a copy :meth:`Outbox._add_deidentified` wrote for
    ``destination``."""
    parts = Path(path).parts
    return any(a == "deidentified" and b == destination for a, b in itertools.pairwise(parts))


class Dispatcher:
    """Sends due deliveries; one run at a time (the scheduler calls :meth:`run_due`)."""

    def __init__(
        self, store: Store, settings: DispatchSettings, identity: Identity | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        # deliveries are claimed under this node's lease: several nodes send from one outbox
        self.identity = identity or Identity("local", lease_s=60.0)
        self._lock = threading.Lock()
        self._again = threading.Event()

    def request(self) -> None:
        """Ask for another pass (a pass already running repeats itself)."""
        self._again.set()

    def run_due(self) -> int:
        """Attempt every due delivery, again while passes are requested; returns the count."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            attempted = self._pass()
            while self._again.is_set():
                self._again.clear()
                attempted += self._pass()
            return attempted
        finally:
            self._lock.release()

    def _claim(self) -> list[Any]:
        """The due deliveries, moved to SENDING under this node's lease: another node's pass
        skips them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite the conditional
        update of the single writer), so each is sent by one node."""
        due_states = [DeliveryState.PENDING, DeliveryState.FAILED]
        with self.store.session() as s:
            ids = list(
                s.scalars(
                    select(Delivery.id)
                    .where(Delivery.state.in_(due_states), Delivery.next_attempt_at <= utcnow())
                    .order_by(Delivery.id)
                    .with_for_update(skip_locked=True)
                )
            )
            if not ids:
                return []
            claimed = set(
                s.scalars(
                    update(Delivery)
                    .where(Delivery.id.in_(ids), Delivery.state.in_(due_states))
                    .values(
                        state=DeliveryState.SENDING,
                        lease_owner=self.identity.owner,
                        lease_until=self.identity.until(),
                    )
                    .returning(Delivery.id)
                )
            )
            rows = s.execute(
                select(Delivery.id, Delivery.destination, Output.path)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.id.in_(claimed))
                .order_by(Delivery.id)
            ).all()
        return list(rows)

    def _pass(self) -> int:
        due = self._claim()
        by_destination: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for delivery_id, destination, path in due:
            by_destination[destination].append((delivery_id, path))
        for destination, items in by_destination.items():
            node = self.settings.destinations.get(destination)
            if node is None:
                reason = f"destination {destination!r} is not configured"
                for delivery_id, _ in items:
                    self._record(delivery_id, False, reason, final=True)
                continue
            if node.deidentify is not None:  # never the identified original (a retry)
                kept = [(i, p) for i, p in items if _deidentified_for(p, destination)]
                for delivery_id, _ in set(items) - set(kept):
                    reason = "refused: an off-site destination gets de-identified copies only"
                    self._record(delivery_id, False, reason, final=True)
                if not kept:
                    continue
                items = kept
            commitments: dict[int, str] = {}
            transaction = None
            if isinstance(node, DicomNode) and node.storage_commitment:
                # Recorded before the N-ACTION: the destination's report may arrive at once.
                transaction = generate_uid()
                with self.store.session() as s:
                    s.execute(
                        update(Delivery)
                        .where(Delivery.id.in_([i for i, _ in items]))
                        .values(transaction_uid=transaction, commitment=CommitmentState.PENDING)
                    )
            t0 = time.perf_counter()
            try:
                answers = send(node, items, self.settings, commitments, transaction)
            except Exception as exc:  # a sender bug must not stop the other destinations
                log.exception("sending to %s failed", destination)
                answers = [(i, False, f"internal error: {exc}") for i, _ in items]
            each = (time.perf_counter() - t0) / max(1, len(items))
            for _, ok, _ in answers:
                metrics.SEND_SECONDS.labels(destination, "sent" if ok else "failed").observe(each)
            for delivery_id, ok, answer in answers:
                self._record(delivery_id, ok, answer, transaction_uid=commitments.get(delivery_id))
        self._finish_jobs()
        return len(due)

    def _record(
        self,
        delivery_id: int,
        ok: bool,
        answer: str,
        final: bool = False,
        transaction_uid: str | None = None,
    ) -> None:
        with self.store.session() as s:
            # The destination's report may arrive at any moment (dispatch.commitment): the
            # commitment moves in one conditional UPDATE, which also takes the write lock, so
            # the row read next is the latest and no report is overwritten.
            row, pending = Delivery.id == delivery_id, CommitmentState.PENDING
            if transaction_uid is not None:
                s.execute(update(Delivery).where(row).values(transaction_uid=transaction_uid))
                s.execute(
                    update(Delivery)
                    .where(row, Delivery.commitment.is_(None) | (Delivery.commitment == pending))
                    .values(commitment=CommitmentState.REQUESTED)
                )
            else:  # not requested after all (the C-STORE failed)
                s.execute(
                    update(Delivery)
                    .where(row, Delivery.commitment == pending)
                    .values(commitment=None)
                )
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            if d.lease_owner not in (None, self.identity.owner):
                log.warning(
                    "delivery %s: taken over by %s, answer dropped", delivery_id, d.lease_owner
                )
                return
            d.lease_owner = d.lease_until = None
            d.attempts += 1
            d.last_status = answer
            d.updated_at = utcnow()
            if ok and d.commitment is CommitmentState.FAILED:
                # the destination already reported it could not commit: send it again
                d.state, d.next_attempt_at = DeliveryState.FAILED, utcnow()
                d.last_status = f"{answer}; but storage commitment failed"
            elif ok:
                d.state = DeliveryState.SENT
                # A job failed for a dead delivery that was retried: once one of its deliveries
                # is sent it is dispatching again, and the next check ends it done (or failed,
                # if one is dead still). The retry flips it too, but a check that read the
                # delivery before the retry could have failed it again meanwhile.
                output = s.get(Output, d.output_id)
                job = s.get(Job, output.job_id) if output is not None else None
                if job is not None and job.state is JobState.FAILED:
                    job.state, job.error, job.finished_at = JobState.DISPATCHING, None, None
                if d.created_at is not None:
                    latency = max(0.0, (d.updated_at - d.created_at).total_seconds())
                    metrics.DELIVERY_SECONDS.labels(d.destination).observe(latency)
            elif final or d.attempts >= self.settings.max_attempts:
                d.state = DeliveryState.DEAD
                output = s.get(Output, d.output_id)
                s.add(
                    Event(
                        kind="delivery_dead",
                        job_id=output.job_id if output else None,
                        detail=REGISTRY.redact(
                            f"delivery {d.id} to {d.destination} after {d.attempts} "
                            f"attempt(s): {answer}"
                        ),
                    )
                )
            else:
                d.state = DeliveryState.FAILED
                delay = min(
                    self.settings.backoff_max_s, self.settings.backoff_s * 2 ** (d.attempts - 1)
                )
                d.next_attempt_at = utcnow() + timedelta(seconds=delay)
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "delivery %s: %s", delivery_id, answer)

    def _finish_jobs(self) -> None:
        """A dispatching job is done when all its deliveries are sent; failed if one is dead."""
        with self.store.session() as s:
            jobs = s.scalars(select(Job).where(Job.state == JobState.DISPATCHING)).all()
            for job in jobs:
                rows = s.execute(
                    select(Delivery.state, Delivery.destination, Delivery.last_status)
                    .join(Output, Output.id == Delivery.output_id)
                    .where(Output.job_id == job.id)
                ).all()
                dead = [r for r in rows if r.state == DeliveryState.DEAD]
                if dead:
                    job.state = JobState.FAILED
                    job.error = REGISTRY.redact(
                        f"delivery to {dead[0].destination} failed: {dead[0].last_status}"
                    )
                    job.finished_at = utcnow()
                    s.add(
                        Event(
                            kind="job_failed",
                            job_id=job.id,
                            study_uid=job.study_uid,
                            detail=job.error,
                        )
                    )
                elif all(r.state == DeliveryState.SENT for r in rows):
                    job.state = JobState.DONE
                    job.finished_at = utcnow()
                    started = job.timings.get("dispatch_started_at")
                    if started is not None:
                        took = round(time.time() - started, 3)
                        job.timings = {**job.timings, "dispatch_s": took}
                        metrics.observe_stages({"dispatch_s": took}, list(job.models or []))
                else:
                    continue
                metrics.observe_job(job.rule, job.state.value, job.started_at, job.finished_at)
                log.info("job %s: %s", job.id, job.state.value)
