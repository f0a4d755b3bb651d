"""The node's HTTP application: DICOMweb of the archive (``dicomweb``), the REST API
(``api``), the dashboard (``dashboard``) and ``/metrics``, each a set of FastAPI routers
behind the gate of ``auth`` (users, roles, tokens, CSRF, the audit); errors are JSON with a
status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from airouter.app.web import auth
from airouter.app.web.api import (
    jobs_router,
    monitoring_router,
    outbox_router,
    rules_router,
    status_router,
)
from airouter.app.web.dashboard import dashboard_router, root_router
from airouter.app.web.dicomweb import dicomweb_router
from airouter.app.web.qido import qido_router
from airouter.app.web.users import users_router
from airouter.app.web.viewer import viewer_router
from airouter.app.web.wado import wado_router
from airouter.core.db import Store
from airouter.core.settings import MonitoringSettings
from airouter.core.tracker import AssociationTracker
from inference.cards import ModelCard
from router.registry import RuleSet
from scp.ingest import Ingest

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_of(netloc: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port``, lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _refusal(request: Request, hosts: frozenset[str]) -> JSONResponse | None:
    """400 for a Host we do not serve; 403 for a state-changing request from another origin
    (a browser page of another site: CSRF). Clients that send no Origin (PACS, scripts,
    curl) are not browsers and pass."""
    host = request.headers.get("host", "")
    if _host_of(host) not in hosts:
        error = f"this server does not answer to host {host[:100]!r} (see http.allowed_hosts)"
        return JSONResponse({"error": error, "status": 400}, 400)
    origin = request.headers.get("origin")
    if request.method in _STATE_CHANGING and origin is not None:
        netloc = origin.split("://", 1)[-1].rstrip("/").lower()
        if origin == "null" or netloc != host.strip().lower():
            error = f"cross-origin {request.method} refused (origin {origin[:100]!r})"
            return JSONResponse({"error": error, "status": 403}, 403)
    return None


def create_app(
    store: Store,
    health: Callable[[], dict[str, Any]],
    ingest: Ingest | None = None,
    tracker: AssociationTracker | None = None,
    ruleset: RuleSet | None = None,
    on_retry: Callable[[], None] | None = None,
    on_job_queued: Callable[[], None] | None = None,
    log_phi: bool = False,
    hosts: frozenset[str] | None = None,
    max_request_bytes: int = 1 << 30,
    body_idle_s: float = 30.0,
    policy: auth.AuthPolicy | None = None,
    cards: dict[str, ModelCard] | None = None,
    data_dir: Path | None = None,
    metrics: Callable[[], bytes] | None = None,
    monitoring: MonitoringSettings | None = None,
) -> FastAPI:
    """The node's HTTP application (STOW-RS when an ingest is given). With ``hosts``, every
    request (the API docs included) must name one of them as its Host, and a state-changing
    one from a browser must come from the same origin. ``policy`` says how users are asked
    for (default: open while no user exists, as on loopback)."""
    app = FastAPI(title="airouter", version="0.1.0")
    auth.install(app, store, policy or auth.AuthPolicy(open_when_no_users=True))

    if hosts is not None:
        served = hosts

        @app.middleware("http")
        async def _same_site(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            refusal = _refusal(request, served)
            return refusal if refusal is not None else await call_next(request)

    @app.exception_handler(HTTPException)
    async def _json_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "status": exc.status_code}, exc.status_code)

    app.include_router(qido_router(store))
    app.include_router(wado_router(store))
    app.include_router(dicomweb_router(store, ingest, tracker, max_request_bytes, body_idle_s))
    app.include_router(rules_router(store, ruleset, log_phi))
    app.include_router(outbox_router(store, on_retry))
    app.include_router(status_router(store, health))
    app.include_router(monitoring_router(store, monitoring or MonitoringSettings()))
    app.include_router(jobs_router(store, on_job_queued, on_retry))
    app.include_router(users_router(store))
    app.include_router(
        dashboard_router(
            store,
            health,
            ruleset,
            cards or {},
            data_dir,
            log_phi,
            on_retry,
            on_job_queued,
            monitoring or MonitoringSettings(),
        )
    )
    app.include_router(viewer_router())
    app.include_router(root_router())
    if metrics is not None:
        app.include_router(metrics_router(metrics))
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return app


STATIC = Path(__file__).parent / "static"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def metrics_router(metrics: Callable[[], bytes]) -> APIRouter:
    """``GET /metrics``: Prometheus text format."""
    app = APIRouter(include_in_schema=False)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(metrics(), media_type=PROMETHEUS_TEXT)

    return app
