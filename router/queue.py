"""Jobs in the database: created when a study completes, claimed by workers by priority."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from airouter.core.db import Event, Instance, Job, Series, Store, Study, instance_counts, utcnow
from airouter.core.vocab import Action, JobState, Priority, Review, RunMode, Source
from router.engine import SeriesInfo, StudyContext, decide, required_series_present
from router.rules import Rule
from router.schedule import OffHours, local_now

log = logging.getLogger(__name__)


def job_options(rule: Rule) -> dict[str, Any]:
    """What of the rule a job carries beyond its columns: its review, its mode, its
    structure template, its input quality checks, its prior comparison and whether burned-in
    annotations may go off-site, when they are not the defaults."""
    options: dict[str, Any] = {}
    if rule.review is not Review.NONE:
        options["review"] = rule.review.value
    if rule.mode is not RunMode.CLINICAL:
        options["mode"] = rule.mode.value
    if rule.template:
        options["template"] = rule.template
    if rule.qc is not None:
        options["qc"] = rule.qc.model_dump(mode="json", exclude_none=True)
    if rule.compare_with_prior is not None:
        options["prior"] = rule.compare_with_prior.model_dump(mode="json")
    if rule.allow_burned_in:
        options["allow_burned_in"] = True
    return options


def study_series(s: Session, study_uid: str) -> list[SeriesInfo]:
    """The received (not produced) series of a study, with instance counts."""
    counts = instance_counts(s, study_uid)
    rows = s.scalars(
        select(Series).where(Series.study_uid == study_uid, Series.source != Source.PRODUCED)
    ).all()
    return [SeriesInfo(r.series_uid, r.tags or {}, counts.get(r.series_uid, 0)) for r in rows]


def study_context(s: Session, study_uid: str) -> StudyContext:
    """The study as the rules see it: its series and where it came from."""
    study = s.get(Study, study_uid)
    first = s.execute(
        select(Instance.calling_ae, Instance.called_ae, Instance.source_address)
        .where(Instance.study_uid == study_uid, Instance.source != Source.PRODUCED)
        .order_by(Instance.id)
        .limit(1)
    ).first()
    return StudyContext(
        series=study_series(s, study_uid),
        calling_ae=first.calling_ae if first else (study.calling_ae if study else None),
        called_ae=first.called_ae if first else None,
        source_address=first.source_address if first else None,
    )


def required_series_ready(s: Session, study_uid: str, rules: Sequence[Rule]) -> bool:
    """Some enabled rule states required series, and the study holds them all; or a rule
    that completes on release applies to the study (the monitor asks only once its senders
    have released their associations)."""
    series = study_series(s, study_uid)
    if any(required_series_present(rule, series) for rule in rules):
        return True
    on_release = [r for r in rules if r.enabled and r.complete_on_release]
    if not on_release:
        return False
    return any(d.series_uid is not None for d in decide(study_context(s, study_uid), on_release))


def route_study(
    s: Session, study_uid: str, rules: Sequence[Rule], off_hours: OffHours | None = None
) -> list[Job]:
    """Create one queued job per matching rule, in the caller's transaction.

    A rule that already ran on the same series with the same instance count is not run again
    (a re-opened study whose new instances do not change what the rule processes); otherwise
    the new job is the next version of the rule's results for this study.
    """
    ctx = study_context(s, study_uid)
    counts = {info.series_uid: info.instance_count for info in ctx.series}
    decisions = decide(ctx, rules)
    jobs = []
    for d in decisions:
        if d.rule.action is Action.DISCARD or d.series_uid is None:
            s.add(Event(kind="study_discarded", study_uid=study_uid, detail=d.rule.name))
            log.info("study %s: discarded by rule %s", study_uid, d.rule.name)
            continue
        previous = s.scalars(
            select(Job).where(Job.study_uid == study_uid, Job.rule == d.rule.name)
        ).all()
        count = counts[d.series_uid]
        # A failed or cancelled run does not count: the study sent again runs the rule again.
        if any(
            p.series_uid == d.series_uid
            and p.instance_count == count
            and p.state not in (JobState.FAILED, JobState.CANCELLED)
            for p in previous
        ):
            s.add(Event(kind="rule_unchanged", study_uid=study_uid, detail=d.rule.name))
            continue
        waits = off_hours is not None and d.rule.off_hours and d.rule.priority is Priority.ROUTINE
        job = Job(
            not_before=off_hours.not_before(local_now()) if waits and off_hours else None,
            action=d.rule.action,
            instance_count=count,
            version=len(previous) + 1,
            study_uid=study_uid,
            series_uid=d.series_uid,
            rule=d.rule.name,
            models=list(d.rule.models),
            outputs=[o.value for o in d.rule.outputs] if d.rule.action is Action.RUN else [],
            seg_type=d.rule.seg_type if d.rule.action is Action.RUN else None,
            destinations=list(d.rule.destinations),
            priority=d.rule.priority.rank,
            options=job_options(d.rule),
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


def claim_next_job(
    store: Store, owner: str | None = None, lease_until: datetime | None = None
) -> int | None:
    """Atomically move the highest-priority, oldest queued job to RUNNING, leased to
    ``owner`` until ``lease_until``; return its id. Several nodes claim from one database:
    on PostgreSQL a row another node is claiming is skipped (``FOR UPDATE SKIP LOCKED``), on
    SQLite the single writer and the conditional update make the claim exclusive."""
    with store.session() as s:
        now = utcnow()
        job_id = s.scalar(
            select(Job.id)
            .where(Job.state == JobState.QUEUED)
            .where((Job.not_before.is_(None)) | (Job.not_before <= now))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job_id is None:
            return None
        claimed = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                started_at=utcnow(),
                attempts=Job.attempts + 1,
                lease_owner=owner,
                lease_until=lease_until,
            )
        )
        return job_id if claimed.rowcount == 1 else None  # type: ignore[attr-defined]
