"""Deciding when a study is complete, from several signals.

A study is *open* while any association or STOW-RS request that sent to it is still running.
Once none is, it completes:

- at once, when every series holds the instance count it announces
  (ImagesInAcquisition x NumberOfTemporalPositions), when a rule's required series are all
  there, or when a rule that applies says ``complete_on_release``;
- otherwise after ``quiet_period_s`` without a new instance.

``study_deadline_s`` after it started receiving, a study completes whatever its state, with
the configured action: ``route`` it as it is, or ``discard`` it (failed, not routed). A study
is routed in the same transaction that marks it complete, so a crash never leaves a complete
study unrouted. An instance arriving later re-opens the study (see scp.ingest), and it
completes again: the router then produces amended results if the selected series changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from airouter.core import metrics
from airouter.core.db import Event, Series, Store, Study, instance_counts, utcnow
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import DeadlineAction, Source, StudyState

log = logging.getLogger(__name__)

OnComplete = Callable[[Session, str], None]
# Whether a study may complete before its quiet period (a rule's required series are present).
Ready = Callable[[Session, str], bool]


@dataclass(frozen=True)
class CompletionPolicy:
    """When a study is complete: the router's settings that say so."""

    quiet_period_s: float = 2.0
    study_deadline_s: float = 1800.0
    deadline_action: DeadlineAction | str = DeadlineAction.ROUTE

    def __post_init__(self) -> None:
        object.__setattr__(self, "deadline_action", DeadlineAction(self.deadline_action))


def announced_count(tags: dict[str, object]) -> int | None:
    """The number of instances a series says it will have, if it says so."""
    try:
        images = int(str(tags.get("ImagesInAcquisition") or 0))
        positions = int(str(tags.get("NumberOfTemporalPositions") or 1))
    except ValueError:
        return None
    return images * max(positions, 1) if images > 0 else None


class CompletionMonitor:
    """Decides, on each :meth:`check`, which receiving studies are complete, and routes them
    (``on_complete``) in the transaction that marks them complete."""

    def __init__(
        self,
        store: Store,
        tracker: AssociationTracker,
        policy: CompletionPolicy,
        on_complete: OnComplete,
        ready: Ready | None = None,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.policy = policy
        self.on_complete = on_complete
        self.ready = ready

    def check(self) -> list[str]:
        """Complete every study whose signals say so; returns the UIDs routed."""
        now = utcnow()
        busy = self.tracker.busy_studies()
        routed: list[str] = []
        with self.store.session() as s:
            # Several nodes check the same studies: on PostgreSQL a study another node's check
            # holds is skipped, and once that check commits it is no longer receiving, so a
            # study completes (and is routed) once. SQLite has a single writer.
            studies = s.scalars(
                select(Study)
                .where(Study.state == StudyState.RECEIVING)
                .with_for_update(skip_locked=True)
            ).all()
            for study in studies:
                reason = self._reason(s, study, study.study_uid in busy, now)
                if reason is None:
                    continue
                study.state = StudyState.COMPLETE
                study.completed_at = now
                waited = max(0.0, (now - study.last_received_at).total_seconds())
                metrics.COMPLETION_WAIT.labels(reason).observe(waited)
                s.add(Event(kind="study_complete", study_uid=study.study_uid, detail=reason))
                if reason == "deadline" and self.policy.deadline_action is DeadlineAction.DISCARD:
                    s.add(
                        Event(
                            kind="study_discarded",
                            study_uid=study.study_uid,
                            detail="deadline reached while receiving",
                        )
                    )
                    log.warning("study %s discarded: deadline reached", study.study_uid)
                    continue
                self.on_complete(s, study.study_uid)
                routed.append(study.study_uid)
                log.info("study %s complete (%s)", study.study_uid, reason)
        return routed

    def _reason(self, s: Session, study: Study, busy: bool, now: datetime) -> str | None:
        if study.opened_at <= now - timedelta(seconds=self.policy.study_deadline_s):
            return "deadline"
        if busy or study.last_received_at > now:  # a sender is active, or restart grace
            return None
        if self._announced_counts_reached(s, study.study_uid):
            return "announced counts reached"
        if self.ready is not None and self.ready(s, study.study_uid):
            return "required series present, or released (a rule completes on release)"
        if study.interrupted_at is not None:
            return None  # cut off by a crash: a quiet study may be a partial one
        if study.last_received_at <= now - timedelta(seconds=self.policy.quiet_period_s):
            return "quiet period"
        return None

    def _announced_counts_reached(self, s: Session, study_uid: str) -> bool:
        series = s.execute(
            select(Series.series_uid, Series.tags).where(
                Series.study_uid == study_uid, Series.source != Source.PRODUCED
            )
        ).all()
        counts = instance_counts(s, study_uid)
        if not series:
            return False
        for series_uid, tags in series:
            expected = announced_count(tags or {})
            if expected is None or counts.get(series_uid, 0) < expected:
                return False
        return True
