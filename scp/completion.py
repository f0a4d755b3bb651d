"""Deciding when a study is complete.

A study is complete once no association that sent to it is still open and no instance arrived
for ``quiet_period_s``. The check runs on the scheduler; a complete study is routed in the same
transaction that marks it complete, so a crash never leaves a complete study unrouted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from airouter.db import Store, Study, StudyState, utcnow
from scp.server import AssociationTracker

log = logging.getLogger(__name__)

OnComplete = Callable[[Session, str], None]


class CompletionMonitor:
    def __init__(
        self,
        store: Store,
        tracker: AssociationTracker,
        quiet_period_s: float,
        on_complete: OnComplete,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.quiet_period_s = quiet_period_s
        self.on_complete = on_complete

    def check(self) -> list[str]:
        """Declare every quiet, released study complete; returns their UIDs."""
        cutoff = utcnow() - timedelta(seconds=self.quiet_period_s)
        busy = self.tracker.busy_studies()
        done: list[str] = []
        with self.store.session() as s:
            studies = s.scalars(
                select(Study).where(
                    Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
                )
            ).all()
            for study in studies:
                if study.study_uid in busy:
                    continue
                study.state = StudyState.COMPLETE
                study.completed_at = utcnow()
                self.on_complete(s, study.study_uid)
                done.append(study.study_uid)
        for uid in done:
            log.info("study %s complete", uid)
        return done
