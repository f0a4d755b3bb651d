"""A job's record while it runs: timings and events gathered in memory, written at transitions.

A worker used to commit (and fsync) every timing and every event on its own, about nine
transactions a job; the recorder writes the job row, its timings so far and its pending events
in one transaction per state transition, and once more when the job ends.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airouter.core import metrics
from airouter.core.db import Event, Job, Store, utcnow
from airouter.core.phi import REGISTRY
from airouter.core.vocab import JobState

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Someone cancelled the job while it ran; it stays cancelled and writes nothing more."""


class JobTakenOver(JobCancelled):
    """This node lost the job's lease (it could not renew it in time) and another node took
    the job over: this run writes nothing more."""


class JobRecorder:
    """Collects what one job does and writes it to the store at its state transitions."""

    def __init__(
        self, store: Store, job_id: int, owner: str | None = None, models: list[str] | None = None
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner  # the lease this run holds (None: a single node without leases)
        self.models = models or []  # the job's models: the metrics' label
        self._timings: dict[str, float] = {}
        self._events: list[tuple[str, str]] = []

    def time(self, **seconds: float) -> None:
        """Remember stage timings (seconds, or epoch seconds for ``*_at`` keys); the
        seconds are observed in the metrics."""
        self._timings.update({k: round(v, 3) for k, v in seconds.items()})
        metrics.observe_stages(seconds, self.models)

    def event(self, kind: str, detail: dict[str, Any] | str = "") -> None:
        """Queue an audit event of this job (no PHI), written with the next transition."""
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
        self._events.append((kind, REGISTRY.redact(text)))

    def transition(self, state: JobState | None = None, **values: Any) -> Job:
        """One transaction: the job's new state and ``values``, the timings and events so far.
        Returns the job row (detached, with its new values)."""
        with self.store.session() as s:
            job = s.get(Job, self.job_id, with_for_update=True)
            if job is None:
                raise LookupError(f"job {self.job_id} is gone")
            self.apply(job, state, **values)
            self.flush_events(s, job.study_uid)
        return job

    def apply(self, job: Job, state: JobState | None = None, **values: Any) -> None:
        """Put the new state, ``values`` and the timings on a row of the caller's session.

        Raises :class:`JobCancelled` when the row says the job was cancelled meanwhile."""
        if job.state is JobState.CANCELLED:
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if self.owner is not None and job.lease_owner != self.owner:
            raise JobTakenOver(
                f"job {self.job_id} was taken over by {job.lease_owner or 'recovery'}"
            )
        if state is not None:
            job.state = state
            if state.ended and "finished_at" not in values:
                job.finished_at = utcnow()
            if state.ended:
                metrics.observe_job(job.rule, state.value, job.started_at, job.finished_at)
        for key, value in values.items():
            setattr(job, key, value)
        if self._timings:
            job.timings = {**(job.timings or {}), **self._timings}
            self._timings = {}

    def flush_events(self, s: Any, study_uid: str | None) -> None:
        """Add the pending events to the caller's session (with its own transition)."""
        for kind, detail in self._events:
            s.add(Event(kind=kind, detail=detail, job_id=self.job_id, study_uid=study_uid))
        self._events = []

    def fail(self, reason: str) -> None:
        """End the job ``failed`` with ``reason``, recorded as an event (a header value that
        slipped into the reason is redacted unless ``log_phi`` is on)."""
        reason = REGISTRY.redact(reason)
        log.warning("job %s failed: %s", self.job_id, reason)
        self.event("job_failed", reason)
        self.transition(JobState.FAILED, error=reason)
