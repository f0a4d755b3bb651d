"""The dashboard under ``/dashboard``: server-rendered pages (Jinja2) that htmx keeps live.

Each page's table is a fragment the page asks for again every two seconds (htmx polling, the
same URL with ``HX-Request``), so a job that starts or a delivery that fails shows without a
reload; long lists page (``offset``, ``limit``). Actions (retry, cancel) are the REST API's,
posted by htmx with the session's CSRF token; the buttons show only to roles that may press
them. Patient ID and name show, and may be searched, only for roles that may act on studies
(operator, admin); a viewer sees UIDs, dates and modalities. htmx is served from the node
(vendored from npm by the Makefile): the pages need nothing outside the hospital network.
"""

from __future__ import annotations

import html
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from airouter.app import accounts
from airouter.app.accounts import Principal
from airouter.app.web.auth import TEMPLATES, small_body
from airouter.core.db import (
    Delivery,
    Event,
    Instance,
    Job,
    Output,
    Series,
    Store,
    Study,
    Transfer,
    jobs_by_state,
    queued_by_priority,
)
from airouter.core.settings import MonitoringSettings
from airouter.core.spool import is_valid_uid
from airouter.core.vocab import DeliveryState, JobState, Priority, Role, StudyState
from airouter.jobs.lifecycle import JobActionError, approve_job, reject_job, structure_names
from airouter.jobs.monitoring import rejections, summarise
from inference.cards import ModelCard
from router.engine import explain
from router.queue import study_context
from router.registry import RuleSet

PAGE = 50
_FAILING = ("failed", "refused", "rejected", "dead", "error")


def _principal(request: Request) -> Principal:
    who = getattr(request.state, "principal", None)
    return who if who is not None else Principal("anonymous", Role.ADMIN, "open")


def _render(request: Request, page: str, context: dict[str, Any]) -> Response:
    """The whole page, or only its live fragment when htmx asks for it again."""
    who = _principal(request)
    context = {
        **context,
        "principal": who,
        "may_act": who.role.may(Role.OPERATOR),
        "may_see_phi": who.role.may(Role.OPERATOR),
        "is_admin": who.role.may(Role.ADMIN),
        "page": page,
        "csrf": who.csrf or "",
    }
    fragment = request.headers.get("hx-request") == "true" and not request.headers.get("hx-boosted")
    name = f"_{page}.html" if fragment else f"{page}.html"
    return TEMPLATES.TemplateResponse(request, name, context)


def _window(offset: int, limit: int) -> tuple[int, int]:
    """A list's offset and page size as asked, within bounds (at most 500 a page)."""
    return max(0, offset), max(1, min(limit, 500))


def _paging(offset: int, limit: int, shown: int) -> dict[str, int | None]:
    """The links of a page of ``limit`` at ``offset`` that fetched ``shown`` (limit + 1 when
    there is a next page)."""
    return {
        "offset": offset,
        "limit": limit,
        "previous": max(0, offset - limit) if offset > 0 else None,
        "next": offset + limit if shown > limit else None,
    }


def _z(value: Any) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value is not None else ""


def _jobs_with_outputs(s: Session, jobs: list[Job]) -> list[dict[str, Any]]:
    ids = [j.id for j in jobs]
    outputs = s.scalars(select(Output).where(Output.job_id.in_(ids))).all() if ids else []
    by_job: dict[int, list[str]] = {}
    for o in outputs:
        by_job.setdefault(o.job_id, []).append(o.kind.value)
    return [
        {
            "job": j,
            "outputs": sorted(set(by_job.get(j.id, []))),
            "timings": {
                k: round(v, 2) for k, v in (j.timings or {}).items() if not k.endswith("_at")
            },
            "retryable": j.state in (JobState.FAILED, JobState.CANCELLED),
            "cancellable": j.state in (JobState.QUEUED, JobState.WAITING_INFERENCE),
            "reviewable": j.state is JobState.AWAITING_REVIEW,
            "shadow": (j.options or {}).get("mode") == "shadow",
            "created": _z(j.created_at),
        }
        for j in jobs
    ]


def _deliveries(s: Session, where: Any, offset: int, limit: int) -> list[dict[str, Any]]:
    q = select(Delivery, Output).join(Output, Output.id == Delivery.output_id).where(*where)
    rows = s.execute(q.order_by(Delivery.id.desc()).offset(offset).limit(limit + 1)).all()
    return [
        {
            "d": d,
            "job_id": o.job_id,
            "kind": o.kind.value,
            "sop": o.sop_instance_uid,
            "updated": _z(d.updated_at),
            "retryable": d.state in (DeliveryState.FAILED, DeliveryState.DEAD),
        }
        for d, o in rows
    ]


def dashboard_router(
    store: Store,
    health: Callable[[], dict[str, Any]],
    ruleset: RuleSet | None,
    cards: dict[str, ModelCard],
    data_dir: Path | None,
    log_phi: bool,
    on_retry: Callable[[], None] | None = None,
    on_job_queued: Callable[[], None] | None = None,
    monitoring: MonitoringSettings | None = None,
) -> APIRouter:
    """The dashboard's pages."""
    watch = monitoring or MonitoringSettings()
    app = APIRouter(prefix="/dashboard", include_in_schema=False)

    @app.get("", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        """Receiving now, the queue, jobs per state, failing deliveries, disk, Triton."""
        status = health()
        with store.session() as s:
            receiving = s.scalar(select(func.count()).where(Study.state == StudyState.RECEIVING))
            transfers = s.scalar(select(func.count(Transfer.id)))
            queued, states = queued_by_priority(s), jobs_by_state(s)
            failing = dict(
                s.execute(
                    select(Delivery.state, func.count())
                    .where(Delivery.state.in_([DeliveryState.FAILED, DeliveryState.DEAD]))
                    .group_by(Delivery.state)
                ).all()
            )
            errors = s.scalars(
                select(Event)
                .where(or_(*(Event.kind.contains(word) for word in _FAILING)))
                .order_by(Event.id.desc())
                .limit(10)
            ).all()
        disk = shutil.disk_usage(data_dir) if data_dir is not None and data_dir.exists() else None
        return _render(
            request,
            "overview",
            {
                "receiving": receiving or 0,
                "transfers": transfers or 0,
                "queue": [(p.value, queued.get(p.rank, 0)) for p in Priority],
                "states": [(state.value, states.get(state, 0)) for state in JobState],
                "failing": {k.value: v for k, v in failing.items()},
                "disk_free_gb": round(disk.free / 2**30, 1) if disk else None,
                "disk_free_pct": round(100 * disk.free / disk.total) if disk else None,
                "health": status,
                "errors": [(e, _z(e.at)) for e in errors],
            },
        )

    @app.get("/studies", response_class=HTMLResponse)
    def studies(
        request: Request,
        date_from: str = "",
        date_to: str = "",
        modality: str = "",
        calling_ae: str = "",
        patient_id: str = "",
        offset: int = 0,
        limit: int = PAGE,
    ) -> Response:
        """Studies, newest first, searched by date, modality, calling AE (and patient ID for
        roles that may see it)."""
        who = _principal(request)
        offset, limit = _window(offset, limit)
        with store.session() as s:
            q = select(Study)
            if date_from:
                q = q.where(Study.study_date >= date_from.replace("-", ""))
            if date_to:
                q = q.where(Study.study_date <= date_to.replace("-", ""))
            if calling_ae:
                q = q.where(Study.calling_ae == calling_ae)
            if patient_id and who.role.may(Role.OPERATOR):
                q = q.where(Study.patient_id == patient_id)
            if modality:
                q = q.where(
                    Study.study_uid.in_(
                        select(Series.study_uid).where(Series.modality == modality.upper())
                    )
                )
            found = s.scalars(
                q.order_by(Study.created_at.desc()).offset(offset).limit(limit + 1)
            ).all()
            uids = [x.study_uid for x in found]
            modalities: dict[str, set[str]] = {}
            for uid, mod in s.execute(
                select(Series.study_uid, Series.modality).where(Series.study_uid.in_(uids))
            ).all():
                modalities.setdefault(uid, set()).add(mod or "")
            counts = dict(
                s.execute(
                    select(Instance.study_uid, func.count())
                    .where(Instance.study_uid.in_(uids))
                    .group_by(Instance.study_uid)
                ).all()
            )
        paging = _paging(offset, limit, len(found))
        rows = [
            {
                "study": x,
                "modalities": ", ".join(sorted(m for m in modalities.get(x.study_uid, ()) if m)),
                "instances": counts.get(x.study_uid, 0),
                "created": _z(x.created_at),
            }
            for x in found[:limit]
        ]
        query = {
            "date_from": date_from,
            "date_to": date_to,
            "modality": modality,
            "calling_ae": calling_ae,
            "patient_id": patient_id if who.role.may(Role.OPERATOR) else "",
        }
        return _render(request, "studies", {"rows": rows, "paging": paging, "query": query})

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study(request: Request, study_uid: str) -> Response:
        """A study: its series, jobs, outputs, deliveries and events."""
        if not is_valid_uid(study_uid):
            raise HTTPException(400, "not a valid UID")
        with store.session() as s:
            found = s.get(Study, study_uid)
            if found is None:
                raise HTTPException(404, "study not found")
            series = s.execute(
                select(Series, func.count(Instance.id))
                .outerjoin(Instance, Instance.series_uid == Series.series_uid)
                .where(Series.study_uid == study_uid)
                .group_by(Series.series_uid)
                .order_by(Series.series_number)
            ).all()
            jobs = list(
                s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)).all()
            )
            job_ids = [j.id for j in jobs]
            deliveries = _deliveries(s, [Output.job_id.in_(job_ids)], 0, 1000) if job_ids else []
            events = s.scalars(
                select(Event)
                .where(or_(Event.study_uid == study_uid, Event.job_id.in_(job_ids or [-1])))
                .order_by(Event.id.desc())
                .limit(200)
            ).all()
            context = {
                "study": found,
                "created": _z(found.created_at),
                "series": [{"series": x, "instances": n} for x, n in series],
                "jobs": _jobs_with_outputs(s, jobs),
                "deliveries": deliveries,
                "events": [(e, _z(e.at)) for e in events],
            }
        return _render(request, "study", context)

    @app.get("/jobs/{job_id}/review", response_class=HTMLResponse)
    def review(request: Request, job_id: int) -> Response:
        """A job's results awaiting review: its structures to choose among, the viewer on
        its study, approve or reject (with a reason)."""
        with store.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"job {job_id} not found")
            row = _jobs_with_outputs(s, [job])[0]
            held = _deliveries(s, [Output.job_id == job_id], 0, 1000)
        context = {
            "r": row,
            "structures": structure_names(store, job_id),
            "deliveries": held,
            "destinations": sorted({d["d"].destination for d in held}),
        }
        return _render(request, "review", context)

    @app.post("/jobs/{job_id}/review", response_class=HTMLResponse)
    async def decide(request: Request, job_id: int) -> Response:
        """The review form (htmx): approve (the structures ticked) or reject (a reason); on
        success the browser goes to the study's page."""
        form = urllib.parse.parse_qs((await small_body(request)).decode(errors="replace"))
        decision = (form.get("decision") or [""])[0]
        actor = _principal(request).name
        try:
            if decision == "approve":
                chosen = form.get("structure", [])
                new_id = await run_in_threadpool(
                    approve_job, store, job_id, actor, chosen if "structures" in form else None
                )
                wake = on_job_queued if new_id is not None else on_retry
                if wake is not None:
                    wake()
            elif decision == "reject":
                reason = (form.get("reason") or [""])[0]
                await run_in_threadpool(reject_job, store, job_id, actor, reason)
            else:
                raise JobActionError(400, "decision is approve or reject")
        except JobActionError as exc:
            return HTMLResponse(
                f'<p class="error" id="review-error">{html.escape(str(exc))}</p>', exc.status
            )
        with store.session() as s:
            job = s.get(Job, job_id)
            study_uid = job.study_uid if job is not None else ""
        target = f"/dashboard/studies/{study_uid}"
        return HTMLResponse("", 200, headers={"HX-Redirect": target})

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs(
        request: Request, state: JobState | None = None, offset: int = 0, limit: int = PAGE
    ) -> Response:
        """Jobs, newest first: state, stage timings, error; retry and cancel."""
        offset, limit = _window(offset, limit)
        with store.session() as s:
            q = select(Job)
            if state is not None:
                q = q.where(Job.state == state)
            found = list(s.scalars(q.order_by(Job.id.desc()).offset(offset).limit(limit + 1)).all())
            paging = _paging(offset, limit, len(found))
            rows = _jobs_with_outputs(s, found[:limit])
        return _render(
            request,
            "jobs",
            {
                "rows": rows,
                "paging": paging,
                "states": [x.value for x in JobState],
                "query": {"state": state.value if state else ""},
            },
        )

    @app.get("/outbox", response_class=HTMLResponse)
    def outbox(
        request: Request,
        state: DeliveryState | None = None,
        destination: str = "",
        offset: int = 0,
        limit: int = PAGE,
    ) -> Response:
        """The outbox: each delivery's state and the destination's answer; retry."""
        where: list[Any] = []
        if state is not None:
            where.append(Delivery.state == state)
        if destination:
            where.append(Delivery.destination == destination)
        offset, limit = _window(offset, limit)
        with store.session() as s:
            rows = _deliveries(s, where, offset, limit)
            destinations = sorted(s.scalars(select(Delivery.destination).distinct()).all())
        paging = _paging(offset, limit, len(rows))
        return _render(
            request,
            "outbox",
            {
                "rows": rows[:limit],
                "paging": paging,
                "states": [x.value for x in DeliveryState],
                "destinations": destinations,
                "query": {"state": state.value if state else "", "destination": destination},
            },
        )

    @app.get("/rules", response_class=HTMLResponse)
    def rules(request: Request, study: str = "") -> Response:
        """The rules in force with their files, the last rejected edit, and a dry run."""
        status = ruleset.status() if ruleset is not None else {"rules": [], "error": None}
        dry: dict[str, Any] | None = None
        if study:
            dry = {"study": study, "error": None, "verdicts": []}
            if not is_valid_uid(study):
                dry["error"] = "not a valid Study Instance UID"
            elif ruleset is not None:
                with store.session() as s:
                    if s.get(Study, study) is None:
                        dry["error"] = "no such study in the archive"
                    else:
                        ctx = study_context(s, study)
                        dry["verdicts"] = explain(ctx, ruleset.rules, show_identifying=log_phi)
        return _render(request, "rules", {"status": status, "dry": dry, "study": study})

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request) -> Response:
        """Model cards: version, checksum, labels, training, and whether Triton has it ready."""
        status = health()
        ready = status.get("models_ready", {})
        in_use = set(status.get("models_in_use", cards))
        rows = [
            {"card": card, "ready": bool(ready.get(name)), "in_use": name in in_use}
            for name, card in sorted(cards.items())
        ]
        with store.session() as s:
            stats = summarise(s, watch)
            refused = [r for r in rejections(s) if r["rejected"]]
        return _render(
            request, "models", {"rows": rows, "stats": stats, "rejections": refused, "watch": watch}
        )

    @app.get("/audit", response_class=HTMLResponse)
    def audit(
        request: Request,
        kind: str = "",
        study: str = "",
        user: str = "",
        offset: int = 0,
        limit: int = PAGE,
    ) -> Response:
        """The audit trail, newest first, filtered by kind, study and user."""
        offset, limit = _window(offset, limit)
        with store.session() as s:
            q = select(Event)
            if kind:
                q = q.where(Event.kind == kind)
            if study:
                q = q.where(Event.study_uid == study)
            if user:
                q = q.where(Event.actor == user)
            found = s.scalars(q.order_by(Event.id.desc()).offset(offset).limit(limit + 1)).all()
            kinds = sorted(s.scalars(select(Event.kind).distinct()).all())
        paging = _paging(offset, limit, len(found))
        return _render(
            request,
            "audit",
            {
                "rows": [(e, _z(e.at)) for e in found[:limit]],
                "paging": paging,
                "kinds": kinds,
                "query": {"kind": kind, "study": study, "user": user},
            },
        )

    @app.get("/users", response_class=HTMLResponse)
    def users(request: Request) -> Response:
        """Users, their roles and tokens; add, remove, make and revoke (admin only)."""
        return _render(
            request,
            "users",
            {
                "users": accounts.list_users(store),
                "tokens": accounts.list_tokens(store),
                "roles": [r.value for r in Role],
            },
        )

    return app


def root_router() -> APIRouter:
    """``/`` leads to the dashboard."""
    app = APIRouter(include_in_schema=False)

    @app.get("/")
    def root() -> Response:
        return RedirectResponse("/dashboard", 303)

    return app
