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

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from airouter.core.db import Event, Job, Store, utcnow
from airouter.core.leases import expired
from airouter.core.vocab import JobState

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


def retry_job(store: Store, job_id: int, actor: str) -> int:
    """Queue a failed or cancelled job again as the next version of its rule's results on
    the study; returns the new job's id."""
    with store.session() as s:
        job = _job_in(s, job_id, (JobState.FAILED, JobState.CANCELLED), "retried")
        latest = s.scalar(
            select(func.max(Job.version)).where(
                Job.study_uid == job.study_uid, Job.rule == job.rule
            )
        )
        again = Job(
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
            retry_of=job.id,
        )
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
