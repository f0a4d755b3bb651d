"""Notifications: receivers (webhooks, FHIR servers) are told when a job ends, waits for
review, or has a STAT finding; durable and retried like the deliveries.

The state store writes a :class:`~airouter.core.db.Notification` in the transaction that moves
a job (the pipeline writes STAT findings). A pass of the :class:`Notifier`:

1. gives each new notification one :class:`~airouter.core.db.NotificationDelivery` per
   configured receiver that wants its event (a shadow run's: only receivers marked ``test``;
   a conditional update marks it expanded, so two nodes never expand one twice);
2. claims the due ones by moving their ``next_attempt_at`` past the node's lease (a node that
   dies mid-send leaves them due again once it passes);
3. builds what each receiver gets from the job, its study and its archived SR, sends it, and
   records the receiver's answer: sent on a 2xx, else retried with exponential backoff until
   ``dispatch.max_attempts``, then dead (an audit event says why).

A webhook gets JSON signed with HMAC-SHA256 (see :class:`WebhookReceiver`); with ``phi``
false it carries no patient ID or accession number, only UIDs, states and measurements. A
FHIR server gets a transaction Bundle (:mod:`dispatch.fhir`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import aliased

from airouter.core.db import (
    Event,
    Instance,
    Job,
    Notification,
    NotificationDelivery,
    Output,
    Store,
    Study,
    utcnow,
)
from airouter.core.leases import Identity
from airouter.core.phi import REGISTRY
from airouter.core.settings import DispatchSettings, FhirReceiver, WebhookReceiver
from airouter.core.vocab import DeliveryState, Notify, OutputKind, Priority, RunMode
from dispatch.fhir import report_bundle
from dispatch.report import Group, read_groups

log = logging.getLogger(__name__)

_DUE = (DeliveryState.PENDING, DeliveryState.FAILED)
_ISSUER = "IssuerOfPatientID"


def _earlier_unsent() -> Any:
    """Whether the outer query's NotificationDelivery has an earlier one to the same receiver
    about the same job that is not yet sent (nor dead): a receiver hears of a job in order
    (a FHIR server's preliminary report before the final one), whatever each one's backoff.
    One held back is never attempted meanwhile: it is due as soon as the earlier one is
    settled, in the same pass."""
    earlier, theirs, ours = (
        aliased(NotificationDelivery),
        aliased(Notification),
        aliased(Notification),
    )
    return (
        select(earlier.id)
        .join(theirs, theirs.id == earlier.notification_id)
        .join(ours, ours.job_id == theirs.job_id)
        .where(
            ours.id == NotificationDelivery.notification_id,
            earlier.receiver == NotificationDelivery.receiver,
            earlier.id < NotificationDelivery.id,
            earlier.state.in_(_DUE),
        )
        .exists()
    )


@dataclass
class JobSummary:
    """What a notification says about a job: read from the store and the archived SR when
    it is sent (the same on every attempt)."""

    notification_id: int
    event: Notify
    at: datetime
    job_id: int
    version: int
    rule: str
    priority: str
    models: list[str]
    state: str
    error: str | None
    study_uid: str
    series_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    accession_number: str | None = None
    outputs: list[dict[str, str]] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def as_json(self, phi: bool) -> dict[str, Any]:
        """The webhook's body; patient ID and accession number only with ``phi``."""
        study: dict[str, Any] = {
            "study_instance_uid": self.study_uid,
            "series_instance_uid": self.series_uid,
        }
        if phi:
            study |= {
                "patient_id": self.patient_id,
                "issuer_of_patient_id": self.issuer_of_patient_id,
                "accession_number": self.accession_number,
            }
        return {
            "event": self.event.value,
            "notification_id": self.notification_id,
            "at": _instant(self.at),
            "job": {
                "id": self.job_id,
                "version": self.version,
                "rule": self.rule,
                "priority": self.priority,
                "models": self.models,
                "state": self.state,
                "error": self.error,
            },
            "study": study,
            "outputs": self.outputs,
            "results": [g.as_json() for g in self.groups],
        }

    def conclusion(self) -> str:
        """One line for a FHIR report's conclusion."""
        if self.event in (Notify.FAILED, Notify.REJECTED, Notify.CANCELLED):
            return f"AI analysis {self.event.value}: {self.error or 'no reason given'}"
        parts = []
        for g in self.groups:
            for m in g.measurements:
                if m.derivation is None and m.unit.value in ("ml", "cm3", "mm3"):
                    parts.append(f"{g.tracking_identifier}: {m.value:.1f} {m.unit.value}")
            for name, value in g.evaluations:
                parts.append(f"{g.tracking_identifier or name.meaning}: {value.meaning}")
        head = "AI analysis awaiting review" if self.event is not Notify.DONE else "AI analysis"
        if self.event is Notify.STAT_FINDING:
            head = "STAT finding (not yet reviewed)"
        return f"{head}: " + ("; ".join(parts) if parts else "no finding")


def _instant(at: datetime) -> str:
    """A naive UTC time as an ISO 8601 instant with its zone (what FHIR's instant wants)."""
    return at.replace(tzinfo=UTC).isoformat(timespec="seconds")


def _priority_name(rank: int) -> str:
    for p in Priority:
        if p.rank == rank:
            return p.value
    return str(rank)


class Notifier:
    """Sends due notifications; one pass at a time (the scheduler calls :meth:`run_due`)."""

    def __init__(
        self, store: Store, settings: DispatchSettings, identity: Identity | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.identity = identity or Identity("local", lease_s=60.0)
        self._lock = threading.Lock()

    def run_due(self) -> int:
        """Expand new notifications, then attempt every due one; returns how many."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            self._expand()
            attempted = 0
            while batch := self._claim():
                for delivery_id, notification_id, receiver in batch:
                    self._attempt(delivery_id, notification_id, receiver)
                attempted += len(batch)
            return attempted
        finally:
            self._lock.release()

    def _expand(self) -> None:
        receivers = self.settings.receivers
        with self.store.session() as s:
            ids = list(
                s.scalars(
                    select(Notification.id)
                    .where(Notification.expanded.is_(False))
                    .order_by(Notification.id)
                    .limit(500)
                    .with_for_update(skip_locked=True)
                )
            )
            if not ids:
                return
            mine = list(
                s.scalars(
                    update(Notification)
                    .where(Notification.id.in_(ids), Notification.expanded.is_(False))
                    .values(expanded=True)
                    .returning(Notification.id)
                )
            )
            rows = s.execute(
                select(Notification.id, Notification.event, Job.options)
                .join(Job, Job.id == Notification.job_id)
                .where(Notification.id.in_(mine))
            ).all()
            for notification_id, event, options in rows:
                shadow = (options or {}).get("mode") == RunMode.SHADOW
                for name, receiver in receivers.items():
                    if event in receiver.events and (receiver.test or not shadow):
                        s.add(NotificationDelivery(notification_id=notification_id, receiver=name))

    def _claim(self) -> list[tuple[int, int, str]]:
        now = utcnow()
        with self.store.session() as s:
            ids = list(
                s.scalars(
                    select(NotificationDelivery.id)
                    .where(
                        NotificationDelivery.state.in_(_DUE),
                        NotificationDelivery.next_attempt_at <= now,
                        ~_earlier_unsent(),
                    )
                    .order_by(NotificationDelivery.id)
                    .limit(50)
                    .with_for_update(skip_locked=True, of=NotificationDelivery)
                )
            )
            if not ids:
                return []
            claimed = list(
                s.scalars(
                    update(NotificationDelivery)
                    .where(
                        NotificationDelivery.id.in_(ids),
                        NotificationDelivery.state.in_(_DUE),
                        NotificationDelivery.next_attempt_at <= now,
                    )
                    .values(
                        next_attempt_at=now + timedelta(seconds=self.identity.lease_s),
                        lease_owner=self.identity.owner,
                    )
                    .returning(NotificationDelivery.id)
                )
            )
            rows = s.execute(
                select(
                    NotificationDelivery.id,
                    NotificationDelivery.notification_id,
                    NotificationDelivery.receiver,
                )
                .where(NotificationDelivery.id.in_(claimed))
                .order_by(NotificationDelivery.id)
            ).all()
        return [(int(a), int(b), str(c)) for a, b, c in rows]

    def _attempt(self, delivery_id: int, notification_id: int, name: str) -> None:
        receiver = self.settings.receivers.get(name)
        if receiver is None:
            self._record(delivery_id, False, f"receiver {name!r} is not configured", final=True)
            return
        try:
            summary = self.summary(notification_id)
            if isinstance(receiver, WebhookReceiver):
                ok, answer = send_webhook(receiver, summary, delivery_id)
            else:
                ok, answer = send_fhir(receiver, summary)
        except Exception as exc:  # a bug or an unreadable SR must not stop the other ones
            log.exception("notification %s to %s failed", notification_id, name)
            ok, answer = False, f"internal error: {exc}"
        self._record(delivery_id, ok, answer)

    def summary(self, notification_id: int) -> JobSummary:
        """What notification ``notification_id`` says, from the store and the archive."""
        with self.store.session() as s:
            n = s.get(Notification, notification_id)
            if n is None:
                raise LookupError(f"notification {notification_id} is gone")
            job = s.get(Job, n.job_id)
            if job is None:
                raise LookupError(f"job {n.job_id} is gone")
            study = s.get(Study, job.study_uid)
            outputs = s.scalars(
                select(Output).where(Output.job_id == job.id).order_by(Output.id)
            ).all()
            first = s.scalars(
                select(Instance.path).where(Instance.series_uid == job.series_uid).limit(1)
            ).first()
            summary = JobSummary(
                notification_id=n.id,
                event=n.event,
                at=n.at,
                job_id=job.id,
                version=n.version,
                rule=job.rule,
                priority=_priority_name(job.priority),
                models=list(job.models or []),
                state=job.state.value,
                error=n.error,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                patient_id=study.patient_id if study is not None else None,
                accession_number=study.accession_number if study is not None else None,
                outputs=[
                    {
                        "kind": o.kind.value,
                        "sop_instance_uid": o.sop_instance_uid,
                        "series_instance_uid": o.series_uid,
                    }
                    for o in outputs
                    if o.kind is not OutputKind.ORIGINAL
                ],
            )
            reports = [o.path for o in outputs if o.kind is OutputKind.SR]
        if first is not None:
            try:
                header = dcmread(first, stop_before_pixels=True, specific_tags=[_ISSUER])
                issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
                summary.issuer_of_patient_id = issuer or None
            except (OSError, ValueError):
                pass  # the spool copy is gone (retention): no issuer
        if reports:  # one template's SR says what every other one says
            summary.groups = read_groups(reports[0])
        return summary

    def _record(self, delivery_id: int, ok: bool, answer: str, final: bool = False) -> None:
        answer = REGISTRY.redact(answer)[:1000]
        with self.store.session() as s:
            d = s.get(NotificationDelivery, delivery_id, with_for_update=True)
            if d is None or d.lease_owner != self.identity.owner:
                log.warning("notification delivery %s: taken over, answer dropped", delivery_id)
                return
            d.lease_owner = None
            d.attempts += 1
            d.last_status = answer
            d.updated_at = utcnow()
            if ok:
                d.state = DeliveryState.SENT
            elif final or d.attempts >= self.settings.max_attempts:
                d.state = DeliveryState.DEAD
                n = s.get(Notification, d.notification_id)
                s.add(
                    Event(
                        kind="notification_dead",
                        job_id=n.job_id if n is not None else None,
                        detail=f"{n.event.value if n else '?'} to {d.receiver} after "
                        f"{d.attempts} attempt(s): {answer}",
                    )
                )
            else:
                d.state = DeliveryState.FAILED
                delay = min(
                    self.settings.backoff_max_s, self.settings.backoff_s * 2 ** (d.attempts - 1)
                )
                d.next_attempt_at = utcnow() + timedelta(seconds=delay)
        log.log(
            logging.INFO if ok else logging.WARNING,
            "notification delivery %s: %s",
            delivery_id,
            answer,
        )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def send_webhook(
    receiver: WebhookReceiver, summary: JobSummary, delivery_id: int
) -> tuple[bool, str]:
    """POST the summary as JSON, signed; (accepted, what the receiver said)."""
    import requests

    body = json.dumps(summary.as_json(receiver.phi), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-Airouter-Event": summary.event.value,
        "X-Airouter-Delivery": str(delivery_id),
        "X-Airouter-Timestamp": timestamp,
        "X-Airouter-Signature": sign(receiver.secret, timestamp, body),
    }
    verify: bool | str = str(receiver.ca_file) if receiver.ca_file else True
    try:
        r = requests.post(
            receiver.url, data=body, headers=headers, timeout=receiver.timeout_s, verify=verify
        )
    except (requests.RequestException, OSError) as exc:
        return False, f"webhook {receiver.url} unreachable: {exc}"
    return r.ok, f"webhook HTTP {r.status_code}: {r.text[:200]}".strip()


def send_fhir(receiver: FhirReceiver, summary: JobSummary) -> tuple[bool, str]:
    """POST the transaction Bundle to the FHIR base; (accepted, what the server said)."""
    import requests

    system = receiver.patient_id_system
    if summary.issuer_of_patient_id:  # the issuer names the identifier's namespace
        system = f"urn:dicom:issuer-of-patient-id:{quote(summary.issuer_of_patient_id)}"
    bundle = report_bundle(
        event=summary.event,
        job_id=summary.job_id,
        version=summary.version,
        study_uid=summary.study_uid,
        patient_id=summary.patient_id,
        patient_id_system=system,
        issued=_instant(summary.at),
        groups=summary.groups,
        conclusion=summary.conclusion(),
        device=" + ".join(summary.models) or summary.rule,
    )
    session = requests.Session()
    if receiver.token:
        session.headers["Authorization"] = f"Bearer {receiver.token}"
    elif receiver.username is not None:
        session.auth = (receiver.username, receiver.password or "")
    if receiver.ca_file:
        session.verify = str(receiver.ca_file)
    try:
        r = session.post(
            receiver.url.rstrip("/"),
            data=json.dumps(bundle).encode(),
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
            timeout=receiver.timeout_s,
        )
    except (requests.RequestException, OSError) as exc:
        return False, f"FHIR {receiver.url} unreachable: {exc}"
    return r.ok, f"FHIR HTTP {r.status_code}: {r.text[:200]}".strip()
