"""The REST API under ``/api``: jobs (retry, cancel, review), the outbox, the audit trail, the rules
in force and their dry run on a stored study, health. Errors are JSON with a status.

No answer here exists to show patient data: job errors and event details are redacted when
they are written, and rule explanations withhold identifying values unless ``log_phi``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from airouter.app.web.wado import check_uids
from airouter.core.db import (
    Delivery,
    Evaluation,
    Event,
    Job,
    Notification,
    NotificationDelivery,
    Output,
    Store,
    Study,
    utcnow,
)
from airouter.core.settings import MonitoringSettings
from airouter.core.vocab import DeliveryState, JobState
from airouter.jobs.lifecycle import (
    JobActionError,
    approve_job,
    cancel_job,
    reject_job,
    retry_job,
    structure_names,
)
from airouter.jobs.monitoring import rejections, summarise
from router.engine import explain
from router.queue import study_context
from router.registry import RuleSet


class Approval(BaseModel):
    """An approval: all the job's structures, or only those named."""

    model_config = ConfigDict(extra="forbid")
    structures: list[str] | None = Field(default=None, max_length=500)


class Rejection(BaseModel):
    """A rejection and why."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=1000)


def _actor(request: Request, claimed: str) -> str:
    """Who asked: the signed-in user; on an open server (no users), what the client says."""
    who = getattr(request.state, "principal", None)
    if who is not None and who.via != "open":
        return f"{who.name} (HTTP API, {who.via})"
    return f"{claimed[:32]} (HTTP API)"


def _job_json(
    job: Job,
    outputs: list[Output],
    deliveries: list[Delivery],
    notified: list[tuple[Notification, NotificationDelivery | None]] | None = None,
) -> dict[str, Any]:
    by_output: dict[int, list[dict[str, Any]]] = {}
    for d in deliveries:
        by_output.setdefault(d.output_id, []).append(
            {
                "destination": d.destination,
                "state": d.state.value,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "commitment": d.commitment,
            }
        )
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "rule": job.rule,
        "version": job.version,
        "instance_count": job.instance_count,
        "models": job.models,
        "priority": job.priority,
        "state": job.state.value,
        "attempts": job.attempts,
        "error": job.error,
        "options": job.options or {},  # review, mode, the structures a reviewer chose
        "timings": {k: v for k, v in job.timings.items() if not k.endswith("_at")},
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
        "outputs": [
            {
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "series_uid": o.series_uid,
                "deliveries": by_output.get(o.id, []),
            }
            for o in outputs
        ],
        # what the receivers (webhooks, FHIR) were told, and what they answered
        "notifications": [
            {
                "event": n.event.value,
                "version": n.version,
                "at": n.at.isoformat() + "Z",
                "receiver": d.receiver if d else None,
                "state": d.state.value if d else None,
                "attempts": d.attempts if d else 0,
                "last_status": d.last_status if d else None,
            }
            for n, d in notified or []
        ],
    }


def _job_details(s: Session, job: Job) -> dict[str, Any]:
    outputs = list(s.scalars(select(Output).where(Output.job_id == job.id)).all())
    deliveries = (
        list(
            s.scalars(select(Delivery).where(Delivery.output_id.in_([o.id for o in outputs]))).all()
        )
        if outputs
        else []
    )
    notified = s.execute(
        select(Notification, NotificationDelivery)
        .outerjoin(NotificationDelivery, NotificationDelivery.notification_id == Notification.id)
        .where(Notification.job_id == job.id)
        .order_by(Notification.id, NotificationDelivery.id)
    ).all()
    return _job_json(job, outputs, deliveries, [(n, d) for n, d in notified])


def rules_router(store: Store, ruleset: RuleSet | None, log_phi: bool) -> APIRouter:
    """The rules in force and the dry run of them on a stored study."""
    app = APIRouter(prefix="/api")

    @app.get("/rules")
    def get_rules() -> dict[str, Any]:
        """The rules in force and the last rejected edit, if any."""
        if ruleset is None:
            raise HTTPException(404, "no rules loaded")
        return ruleset.status()

    @app.get("/studies/{study}/rules")
    def dry_run(study: str) -> dict[str, Any]:
        """Which rules would match this stored study, what they would select, and why not."""
        check_uids(study)
        if ruleset is None:
            raise HTTPException(404, "no rules loaded")
        with store.session() as s:
            if s.get(Study, study) is None:
                raise HTTPException(404, "study not found")
            ctx = study_context(s, study)
        verdicts = explain(ctx, ruleset.rules, show_identifying=log_phi)
        return {
            "study": study,
            "series": [
                {
                    "series_uid": x.series_uid,
                    "instances": x.instance_count,
                    "modality": x.tags.get("Modality"),
                }
                for x in ctx.series
            ],
            "rules": [
                {
                    "rule": v.rule.name,
                    "matched": v.matched,
                    "series_uid": v.series_uid,
                    "action": v.rule.action.value,
                    "reason": v.reason,
                }
                for v in verdicts
            ],
        }

    return app


def outbox_router(store: Store, on_retry: Callable[[], None] | None) -> APIRouter:
    """The outbox: deliveries, their state and the destination's answer; retry."""
    app = APIRouter(prefix="/api")

    @app.get("/deliveries")
    def list_deliveries(
        state: DeliveryState | None = None, job: int | None = None
    ) -> list[dict[str, Any]]:
        """The outbox: each (object, destination) with its state and the destination's answer."""
        with store.session() as s:
            q = select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
            if state:
                q = q.where(Delivery.state == state)
            if job is not None:
                q = q.where(Output.job_id == job)
            return [
                {
                    "id": d.id,
                    "job_id": o.job_id,
                    "kind": o.kind,
                    "sop_instance_uid": o.sop_instance_uid,
                    "destination": d.destination,
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "commitment": d.commitment,
                    "next_attempt_at": d.next_attempt_at.isoformat() + "Z",
                }
                for d, o in s.execute(q.order_by(Delivery.id)).all()
            ]

    @app.post("/deliveries/{delivery_id}/retry")
    def retry_delivery(request: Request, delivery_id: int) -> dict[str, Any]:
        """Send a failed or dead delivery again now, with a fresh round of attempts."""
        with store.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise HTTPException(404, f"delivery {delivery_id} not found")
            if d.state not in (DeliveryState.DEAD, DeliveryState.FAILED):
                raise HTTPException(409, f"delivery {delivery_id} is {d.state.value}")
            d.state, d.attempts, d.next_attempt_at = DeliveryState.PENDING, 0, utcnow()
            output = s.get(Output, d.output_id)
            job_row = s.get(Job, output.job_id) if output else None
            if job_row is not None and job_row.state is JobState.FAILED:
                job_row.state, job_row.error = JobState.DISPATCHING, None
            s.add(
                Event(
                    kind="delivery_retry",
                    job_id=output.job_id if output else None,
                    detail=f"delivery {delivery_id} to {d.destination} by {_actor(request, 'api')}",
                )
            )
        if on_retry is not None:
            on_retry()
        return {"id": delivery_id, "state": DeliveryState.PENDING.value}

    return app


def monitoring_router(store: Store, settings: MonitoringSettings) -> APIRouter:
    """Models against the structure sets clinicians sent back, per version and subgroup."""
    app = APIRouter(prefix="/api")

    @app.get("/monitoring")
    def get_monitoring() -> dict[str, Any]:
        """Per model version and subgroup: cases, median Dice, HD95, surface Dice and
        volume difference, and whether flagged (why); reviewers' rejections per model and
        subgroup; the evaluations themselves (no PHI: UIDs, names of structures, numbers)."""
        with store.session() as s:
            stats = summarise(s, settings)
            rows = s.scalars(select(Evaluation).order_by(Evaluation.id)).all()
            return {
                "settings": settings.model_dump(),
                "subgroups": [x.as_json() for x in stats],
                "flagged": [x.as_json() for x in stats if x.flagged],
                "rejections": rejections(s),
                "evaluations": [
                    {
                        "job_id": e.job_id,
                        "evaluated_job_id": e.evaluated_job_id,
                        "study_uid": e.study_uid,
                        "reference_uid": e.reference_uid,
                        "structure": e.structure,
                        "model": e.model,
                        "model_version": e.model_version,
                        "dice": e.dice,
                        "hd95_mm": e.hd95_mm,
                        "surface_dice": e.surface_dice,
                        "volume_ml": e.volume_ml,
                        "reference_volume_ml": e.reference_volume_ml,
                        "volume_difference_ml": e.volume_ml - e.reference_volume_ml,
                        "subgroup": e.subgroup,
                    }
                    for e in rows
                ],
            }

    return app


def status_router(store: Store, health: Callable[[], dict[str, Any]]) -> APIRouter:
    """Health and the audit trail."""
    app = APIRouter(prefix="/api")

    @app.get("/health")
    def get_health() -> dict[str, Any]:
        return health()

    @app.get("/events")
    def list_events(
        study: str | None = None, kind: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        """The audit trail: refusals, routing decisions, failures, who asked what (no PHI)."""
        with store.session() as s:
            q = select(Event).order_by(Event.id)
            if study:
                q = q.where(Event.study_uid == study)
            if kind:
                q = q.where(Event.kind == kind)
            if user:
                q = q.where(Event.actor == user)
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat() + "Z",
                    "kind": e.kind,
                    "study_uid": e.study_uid,
                    "job_id": e.job_id,
                    "detail": e.detail,
                    "user": e.actor,
                }
                for e in s.scalars(q).all()
            ]

    return app


def jobs_router(
    store: Store,
    on_job_queued: Callable[[], None] | None,
    on_retry: Callable[[], None] | None = None,
) -> APIRouter:
    """Jobs: list, one, retry a failed one (a new version), cancel a queued one, approve or
    reject one awaiting review."""
    app = APIRouter(prefix="/api")

    @app.get("/jobs")
    def list_jobs(study: str | None = None) -> list[dict[str, Any]]:
        with store.session() as s:
            q = select(Job).order_by(Job.id)
            if study:
                q = q.where(Job.study_uid == study)
            return [_job_details(s, job) for job in s.scalars(q).all()]

    @app.get("/jobs/{job_id}")
    def get_job(job_id: int) -> dict[str, Any]:
        with store.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"job {job_id} not found")
            return _job_details(s, job)

    @app.post("/jobs/{job_id}/retry")
    def retry(request: Request, job_id: int, actor: str = "api") -> dict[str, Any]:
        """Run a failed or cancelled job again, as the next version of its results."""
        try:
            new_id = retry_job(store, job_id, actor=_actor(request, actor))
        except JobActionError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        if on_job_queued is not None:
            on_job_queued()
        with store.session() as s:
            job = s.get(Job, new_id)
            assert job is not None
            return _job_details(s, job)

    @app.get("/jobs/{job_id}/structures")
    def structures(job_id: int) -> dict[str, Any]:
        """The structures a job's results hold (what a reviewer may choose among)."""
        with store.session() as s:
            if s.get(Job, job_id) is None:
                raise HTTPException(404, f"job {job_id} not found")
        return {"job": job_id, "structures": structure_names(store, job_id)}

    @app.post("/jobs/{job_id}/approve")
    def approve(
        request: Request, job_id: int, body: Approval | None = None, actor: str = "api"
    ) -> dict[str, Any]:
        """Send a job's reviewed results (all, or only the structures named)."""
        chosen = body.structures if body is not None else None
        try:
            new_id = approve_job(store, job_id, _actor(request, actor), chosen)
        except JobActionError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        if new_id is not None and on_job_queued is not None:
            on_job_queued()
        if new_id is None and on_retry is not None:
            on_retry()  # the outbox sends what was held
        with store.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return {**_job_details(s, job), "sent_as_job": new_id}

    @app.post("/jobs/{job_id}/reject")
    def reject(
        request: Request, job_id: int, body: Rejection, actor: str = "api"
    ) -> dict[str, Any]:
        """Withhold a job's reviewed results, with the reason."""
        try:
            reject_job(store, job_id, _actor(request, actor), body.reason)
        except JobActionError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        with store.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return _job_details(s, job)

    @app.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: int, actor: str = "api") -> dict[str, Any]:
        """Cancel a queued job (or one waiting for inference): it never runs."""
        try:
            cancel_job(store, job_id, actor=_actor(request, actor))
        except JobActionError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        with store.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return _job_details(s, job)

    return app
