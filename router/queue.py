"""Jobs in the database: created when a study completes, claimed by workers by priority."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from airouter.db import Event, Instance, Job, JobState, Series, Source, Store, utcnow
from router.engine import SeriesInfo, decide, required_series_present
from router.rules import Rule

log = logging.getLogger(__name__)


def study_series(s: Session, study_uid: str) -> list[SeriesInfo]:
    """The received (not produced) series of a study, with instance counts."""
    counts = dict(
        s.execute(
            select(Instance.series_uid, func.count(Instance.id))
            .where(Instance.study_uid == study_uid)
            .group_by(Instance.series_uid)
        ).all()
    )
    rows = s.scalars(
        select(Series).where(Series.study_uid == study_uid, Series.source != Source.PRODUCED)
    ).all()
    return [SeriesInfo(r.series_uid, r.tags or {}, counts.get(r.series_uid, 0)) for r in rows]


def required_series_ready(s: Session, study_uid: str, rules: Sequence[Rule]) -> bool:
    """Some enabled rule states required series, and the study holds them all."""
    series = study_series(s, study_uid)
    return any(required_series_present(rule, series) for rule in rules)


def route_study(s: Session, study_uid: str, rules: Sequence[Rule]) -> list[Job]:
    """Create one queued job per matching rule, in the caller's transaction.

    A rule that already ran on the same series with the same instance count is not run again
    (a re-opened study whose new instances do not change what the rule processes); otherwise
    the new job is the next version of the rule's results for this study.
    """
    series = study_series(s, study_uid)
    counts = {info.series_uid: info.instance_count for info in series}
    decisions = decide(series, rules)
    jobs = []
    for d in decisions:
        previous = s.scalars(
            select(Job).where(Job.study_uid == study_uid, Job.rule == d.rule.name)
        ).all()
        count = counts[d.series_uid]
        if any(p.series_uid == d.series_uid and p.instance_count == count for p in previous):
            s.add(Event(kind="rule_unchanged", study_uid=study_uid, detail=d.rule.name))
            continue
        job = Job(
            instance_count=count,
            version=len(previous) + 1,
            study_uid=study_uid,
            series_uid=d.series_uid,
            rule=d.rule.name,
            models=list(d.rule.models),
            outputs=[o.value for o in d.rule.outputs],
            destinations=list(d.rule.destinations),
            priority=d.rule.priority.rank,
        )
        s.add(job)
        jobs.append(job)
    s.flush()
    for job in jobs:
        s.add(Event(kind="rule_matched", study_uid=study_uid, job_id=job.id, detail=job.rule))
        log.info("job %s: rule %s matched series %s", job.id, job.rule, job.series_uid)
    if not decisions:
        s.add(Event(kind="no_rule_matched", study_uid=study_uid))
        log.info("study %s: no rule matched", study_uid)
    return jobs


def claim_next_job(store: Store) -> int | None:
    """Atomically move the highest-priority, oldest queued job to RUNNING; return its id."""
    with store.session() as s:
        job_id = s.scalar(
            select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
        )
        if job_id is None:
            return None
        claimed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1)
        )
        return job_id if claimed.rowcount == 1 else None  # type: ignore[attr-defined]
