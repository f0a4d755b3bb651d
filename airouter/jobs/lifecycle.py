"""A job's life outside a worker: recovery after a crash, retry of a failed job, cancel.

Attempts are counted when a worker claims a job (``router.queue.claim_next_job``) and given
back when a clean shutdown interrupts it. A job still in flight when the node starts again was
cut off by a crash: it is queued again, unless it has been cut off ``max_attempts`` times, when
it ends ``failed`` with that reason (a job that crashes the node must not crash it forever).
Retry and cancel are audited events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pydicom
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from airouter.core.db import Delivery, Event, Job, Output, Store, utcnow
from airouter.core.leases import expired
from airouter.core.phi import REGISTRY
from airouter.core.vocab import DeliveryState, JobState, OutputKind

log = logging.getLogger(__name__)


class JobActionError(Exception):
    """A retry or cancel that the job's state does not allow; ``status`` is the HTTP one."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Recovered:
    """What recovery did: jobs queued again and jobs failed for crashing the node."""

    requeued: list[int]
    failed: list[int]


def recover_jobs(store: Store, max_attempts: int, owners: list[str] | None = None) -> Recovered:
    """Every job left in flight by a node that died is queued again, or failed once it has
    been in flight ``max_attempts`` times: those whose lease expired (or that never had one),
    and those of ``owners`` (the previous run of this node, at its start). Jobs leased by a
    live node are left to it. Run at start and periodically by every node."""
    requeued, failed = [], []
    in_flight = [s for s in JobState if s.in_flight]
    taken = or_(expired(Job), Job.lease_owner.in_(owners or []))
    with store.session() as s:
        rows = s.scalars(
            select(Job).where(Job.state.in_(in_flight), taken).with_for_update(skip_locked=True)
        )
        for job in rows.all():
            job.lease_owner = job.lease_until = None
            if job.attempts >= max_attempts:
                job.error = (
                    f"the node stopped {job.attempts} times while this job was in flight "
                    f"(last in state {job.state.value}): it may be what crashes the node; "
                    "retry it once the cause is fixed"
                )
                job.state = JobState.FAILED
                job.finished_at = utcnow()
                s.add(
                    Event(
                        kind="job_failed", job_id=job.id, study_uid=job.study_uid, detail=job.error
                    )
                )
                failed.append(job.id)
            else:
                job.state = JobState.QUEUED
                requeued.append(job.id)
    if requeued:
        log.info("requeued %d interrupted job(s): %s", len(requeued), requeued)
    for job_id in failed:
        log.warning("job %s failed: in flight at %d crashes of the node", job_id, max_attempts)
    return Recovered(requeued, failed)


def _job_in(s: Session, job_id: int, states: tuple[JobState, ...], verb: str) -> Job:
    """The job, if its state allows ``verb``; else 404 or 409 naming what would."""
    job = s.get(Job, job_id)
    if job is None:
        raise JobActionError(404, f"job {job_id} not found")
    if job.state not in states:
        allowed = " or ".join(st.value for st in states)
        raise JobActionError(
            409, f"job {job_id} is {job.state.value}: only a {allowed} job can be {verb}"
        )
    return job


def _next_version(s: Session, job: Job) -> Job:
    """A queued copy of ``job`` as the next version of its rule's results on the study (its
    options, review and mode among them, carried over)."""
    latest = s.scalar(
        select(func.max(Job.version)).where(Job.study_uid == job.study_uid, Job.rule == job.rule)
    )
    return Job(
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        rule=job.rule,
        action=job.action,
        models=list(job.models),
        outputs=list(job.outputs),
        destinations=list(job.destinations),
        instance_count=job.instance_count,
        version=(latest or job.version) + 1,
        priority=job.priority,
        seg_type=job.seg_type,
        options=dict(job.options or {}),
    )


def retry_job(store: Store, job_id: int, actor: str) -> int:
    """Queue a failed or cancelled job again as the next version of its rule's results on
    the study; returns the new job's id."""
    with store.session() as s:
        job = _job_in(s, job_id, (JobState.FAILED, JobState.CANCELLED), "retried")
        again = _next_version(s, job)
        again.retry_of = job.id
        s.add(again)
        s.flush()
        s.add(
            Event(
                kind="job_retried",
                job_id=again.id,
                study_uid=job.study_uid,
                detail=f"retry of job {job.id} by {actor}",
            )
        )
        new_id = again.id
    log.info("job %s: retry of job %s by %s", new_id, job_id, actor)
    return new_id


def cancel_job(store: Store, job_id: int, actor: str) -> None:
    """Cancel a job that is queued or waiting for inference: it never runs (a waiting one
    stops at its next retry)."""
    with store.session() as s:
        job = _job_in(s, job_id, (JobState.QUEUED, JobState.WAITING_INFERENCE), "cancelled")
        job.state = JobState.CANCELLED
        job.finished_at = utcnow()
        job.error = f"cancelled by {actor}"
        s.add(
            Event(
                kind="job_cancelled", job_id=job.id, study_uid=job.study_uid, detail=f"by {actor}"
            )
        )
    log.info("job %s: cancelled by %s", job_id, actor)


def structure_names(store: Store, job_id: int) -> list[str]:
    """The structures a job's results hold: its SEG's segment labels and its RTSTRUCT's ROI
    names, in the order written (what a reviewer may choose among)."""
    with store.session() as s:
        outputs = s.execute(
            select(Output.kind, Output.path).where(
                Output.job_id == job_id, Output.kind.in_([OutputKind.SEG, OutputKind.RTSTRUCT])
            )
        ).all()
    names: list[str] = []
    for kind, path in outputs:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if kind is OutputKind.SEG:
            found = [str(item.SegmentLabel) for item in ds.get("SegmentSequence", [])]
        else:
            found = [str(item.ROIName) for item in ds.get("StructureSetROISequence", [])]
        names.extend(n for n in found if n not in names)
    return names


def _held(s: Session, job_id: int) -> list[Delivery]:
    return list(
        s.scalars(
            select(Delivery)
            .join(Output, Output.id == Delivery.output_id)
            .where(Output.job_id == job_id, Delivery.state == DeliveryState.AWAITING_REVIEW)
        ).all()
    )


def approve_job(
    store: Store, job_id: int, actor: str, structures: list[str] | None = None
) -> int | None:
    """Approve a job's results that await review: its deliveries are queued.

    With ``structures`` (some of :func:`structure_names`), only those are sent: the job's
    own deliveries are withheld and a new version of its results holding only them is
    queued, approved already (the objects sent are new instances whose references hold);
    its id is returned. Audited with the user."""
    chosen = None
    if structures is not None:
        known = structure_names(store, job_id)
        unknown = [n for n in structures if n not in known]
        if unknown:
            raise JobActionError(
                400,
                f"not a structure of job {job_id}: {', '.join(unknown)} "
                f"(it has {', '.join(known) or 'none'})",
            )
        if not structures:
            raise JobActionError(400, "no structure chosen: reject the job instead")
        if set(structures) != set(known):
            chosen = [n for n in known if n in structures]
    with store.session() as s:
        job = _job_in(s, job_id, (JobState.AWAITING_REVIEW,), "approved")
        held = _held(s, job_id)
        if chosen is None:
            for d in held:
                d.state = DeliveryState.PENDING
                d.next_attempt_at = d.updated_at = utcnow()
            job.state = JobState.DISPATCHING
            detail = f"by {actor}: all structures" if structures else f"by {actor}"
            new_id = None
        else:
            again = _next_version(s, job)
            again.options = {
                **{k: v for k, v in (job.options or {}).items() if k != "review"},
                "review": "approved",
                "structures": chosen,
                "reviewed_job": job.id,
                "approved_by": actor,
            }
            s.add(again)
            s.flush()
            new_id = again.id
            for d in held:
                d.state = DeliveryState.WITHHELD
                d.updated_at = utcnow()
                d.last_status = f"replaced by job {new_id}: {actor} approved {', '.join(chosen)}"
            job.state = JobState.DONE
            job.finished_at = utcnow()
            detail = f"by {actor}: only {', '.join(chosen)}, sent as job {new_id}"
            s.add(
                Event(
                    kind="job_queued",
                    job_id=new_id,
                    study_uid=job.study_uid,
                    detail=f"the structures {actor} approved of job {job.id}",
                    actor=actor,
                )
            )
        s.add(
            Event(
                kind="review_approved",
                job_id=job.id,
                study_uid=job.study_uid,
                detail=detail,
                actor=actor,
            )
        )
    log.info("job %s: approved by %s%s", job_id, actor, f" (as job {new_id})" if new_id else "")
    return new_id


def reject_job(store: Store, job_id: int, actor: str, reason: str) -> None:
    """Reject a job's results that await review: nothing is sent; the job ends
    ``rejected`` with the reviewer's reason. Audited with the user."""
    reason = reason.strip()
    if not reason:
        raise JobActionError(400, "a rejection needs a reason")
    with store.session() as s:
        job = _job_in(s, job_id, (JobState.AWAITING_REVIEW,), "rejected")
        for d in _held(s, job_id):
            d.state = DeliveryState.WITHHELD
            d.updated_at = utcnow()
            d.last_status = f"rejected by {actor}"
        job.state = JobState.REJECTED
        job.finished_at = utcnow()
        job.error = REGISTRY.redact(f"rejected by {actor}: {reason[:1000]}")
        s.add(
            Event(
                kind="review_rejected",
                job_id=job.id,
                study_uid=job.study_uid,
                detail=REGISTRY.redact(reason[:1000]),
                actor=actor,
            )
        )
    log.info("job %s: rejected by %s", job_id, actor)  # the reason may name the patient
