"""A receiver hears of a job in order: a notification whose backoff has passed waits while an
earlier one to the same receiver about the same job is not yet settled (the end-to-end case:
a FHIR server got the final report before the preliminary one when the preliminary's longer
backoff ran out later). The receivers' sending is replaced behind its seam; the state store is
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

import dispatch.notify as notify
from airouter.core.db import Job, Notification, NotificationDelivery, Store, utcnow
from airouter.core.settings import DispatchSettings
from airouter.core.vocab import DeliveryState, Notify


def _job(s: Any, study: str) -> Job:
    job = Job(study_uid=study, series_uid=study + ".1", rule="r", models=[], outputs=[])
    job.destinations = []
    s.add(job)
    s.flush()
    return job


def test_a_later_notification_waits_for_an_earlier_one_of_its_job(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(database_url)
    settings = DispatchSettings(
        receivers={"hook": {"kind": "webhook", "url": "http://x/", "secret": "s" * 16}},
        backoff_s=0.01,
    )
    notifier = notify.Notifier(store, settings)
    up = False
    sent: list[str] = []

    def send(receiver: Any, summary: Any, delivery_id: int) -> tuple[bool, str]:
        if up:
            sent.append(f"{summary.job_id}:{summary.event}")
        return up, "200" if up else "connection refused"

    monkeypatch.setattr(notify, "send_webhook", send)
    monkeypatch.setattr(
        notify.Notifier,
        "summary",
        lambda self, nid: _Summary(*_of(store, nid)),
    )
    with store.session() as s:
        job, other = _job(s, "1.2.3"), _job(s, "1.2.4")
        ids = (job.id, other.id)
        s.add(Notification(job_id=job.id, event=Notify.STAT_FINDING))
    assert notifier.run_due() == 1 and sent == []  # down: the STAT finding failed once
    with store.session() as s:
        s.add(Notification(job_id=ids[0], event=Notify.DONE))
        s.add(Notification(job_id=ids[1], event=Notify.DONE))
    up = True
    with store.session() as s:  # the STAT finding's backoff runs longer than the others'
        first = s.scalars(select(NotificationDelivery).order_by(NotificationDelivery.id)).first()
        assert first is not None and first.state is DeliveryState.FAILED
        first.next_attempt_at = utcnow() + timedelta(hours=1)
    notifier.run_due()
    assert sent == [f"{ids[1]}:done"]  # the other job's is not held back; this job's is
    with store.session() as s:
        first = s.get(NotificationDelivery, first.id)
        assert first is not None
        first.next_attempt_at = utcnow()
    notifier.run_due()  # the STAT finding, then at once the report it held back
    assert sent == [f"{ids[1]}:done", f"{ids[0]}:stat_finding", f"{ids[0]}:done"]
    with store.session() as s:
        states = set(s.scalars(select(NotificationDelivery.state)))
    assert states == {DeliveryState.SENT}


class _Summary:
    def __init__(self, job_id: int, event: str) -> None:
        self.job_id, self.event = job_id, event


def _of(store: Store, notification_id: int) -> tuple[int, str]:
    with store.session() as s:
        n = s.get(Notification, notification_id)
        assert n is not None
        return n.job_id, n.event.value
