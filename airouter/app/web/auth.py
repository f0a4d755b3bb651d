"""Who may do what on the HTTP server: users, roles, tokens, sessions, CSRF, the audit.

Every request names its user by a bearer token (``Authorization: Bearer air_...``), basic
authentication, or the dashboard's session cookie. GET needs the ``viewer`` role, a request
that changes state ``operator`` (user administration ``admin``); a cookie-authenticated one
must also carry the session's CSRF token (``X-CSRF-Token``). Every state-changing request is
recorded in the audit trail with its user; failed logins too, and after ``login_max_failures``
in ``login_window_s`` for one name or address, logins are refused with 429 for a while.

With no user at all the server is open, as before users existed: the node refuses to start
so with HTTP on a non-loopback address (``airouter.app.node``), and a server whose last user
was removed while it listens on one answers 401.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from airouter.app import accounts
from airouter.app.accounts import Principal
from airouter.core.db import Event, Store
from airouter.core.vocab import Role

SESSION_COOKIE = "airouter_session"
LOGIN_CSRF_COOKIE = "airouter_login"
CSRF_HEADER = "x-csrf-token"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
# What anyone may reach: the login page and its assets; health, for load balancers and
# container health checks (it names no patient).
_PUBLIC = ("/login", "/static/", "/api/health")
TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")


def _page_url(query: Any, offset: int) -> str:
    """The query string of a list's page at ``offset`` (the filters kept)."""
    items = [(k, v) for k, v in query.multi_items() if k != "offset"]
    return urllib.parse.urlencode([*items, ("offset", str(offset))])


TEMPLATES.env.filters["pageurl"] = _page_url


@dataclass(frozen=True)
class AuthPolicy:
    """How the gate behaves (``http`` settings)."""

    open_when_no_users: bool  # the server listens on loopback only
    session_hours: float = 12.0
    login_max_failures: int = 5
    login_window_s: float = 300.0
    secure_cookies: bool = False  # HTTPS: cookies only over TLS


def needed_role(method: str, path: str) -> Role | None:
    """The least role a request needs (None: anyone)."""
    if any(path == p or (p.endswith("/") and path.startswith(p)) for p in _PUBLIC):
        return None
    if path.startswith(("/api/users", "/api/tokens", "/dashboard/users")):
        return Role.ADMIN
    return Role.VIEWER if method in _READS else Role.OPERATOR


def _wants_html(request: Request) -> bool:
    return request.method in _READS and "text/html" in request.headers.get("accept", "")


class Gate:
    """Resolves each request's user, refuses what its role may not, records what it did."""

    def __init__(self, store: Store, policy: AuthPolicy) -> None:
        self.store = store
        self.policy = policy
        self.passwords = accounts.Passwords(store)

    # -- who is asking ---------------------------------------------------------------------
    def identify(self, request: Request) -> Principal | JSONResponse | None:
        """The request's user; a refusal (401, 429) for credentials that do not hold; None
        for a request that carries none."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            found = accounts.by_token(self.store, value.strip())
            return found or _refuse(401, "the bearer token is unknown or revoked")
        if scheme.lower() == "basic":
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _refuse(401, "malformed basic credentials")
            return self.login(name, password, _address(request), "basic")
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            return accounts.by_session(self.store, cookie)  # expired: as if none
        return None

    def login(self, name: str, password: str, address: str, via: str) -> Principal | JSONResponse:
        """Check a name and password, rate-limited and audited."""
        p = self.policy
        if accounts.recent_failures(self.store, name, address, p.login_window_s) >= (
            p.login_max_failures
        ):
            self._record("login_refused", name, f"from {address}: too many failed logins")
            minutes = max(1, round(p.login_window_s / 60))
            return _refuse(
                429,
                f"too many failed logins for this user or address: try again in {minutes} min",
            )
        found = self.passwords.check(name, password)
        if found is None:
            self._record("login_failed", name, f"from {address}")
            return _refuse(401, "wrong user name or password")
        return Principal(found.name, found.role, via, found.user_id)

    def _record(self, kind: str, actor: str, detail: str) -> None:
        with self.store.session() as s:
            s.add(Event(kind=kind, actor=actor[:64], detail=detail[:500]))

    # -- the middleware --------------------------------------------------------------------
    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Authorise the request by its user's role; audit it if it would change state,
        refused or not."""
        who = await run_in_threadpool(self._principal, request)
        response: Response
        if isinstance(who, Response):
            response, actor = who, "(bad credentials)"
        else:
            request.state.principal = who
            actor = who.name if who is not None else "anonymous"
            response = self._refusal(request, who) or await call_next(request)
        if request.method not in _READS and request.url.path not in ("/login", "/logout"):
            detail = f"{request.method} {request.url.path} -> {response.status_code}"
            await run_in_threadpool(self._record, "http_request", actor, detail)
        return response

    def _refusal(self, request: Request, who: Principal | None) -> Response | None:
        """Why this user may not make this request (None: they may)."""
        need = needed_role(request.method, request.url.path)
        if need is None:
            return None
        if who is None:
            if _wants_html(request):
                target = urllib.parse.quote(request.url.path, safe="/")
                return RedirectResponse(f"/login?next={target}", 303)
            return _refuse(401, "sign in: a bearer token, basic authentication or a session")
        if not who.role.may(need):
            return _refuse(403, f"{who.name} is {who.role.value}: this needs the {need.value} role")
        if (
            who.via == "session"
            and request.method not in _READS
            and request.url.path not in ("/login", "/logout")
            and not accounts.same_secret(request.headers.get(CSRF_HEADER), who.csrf)
        ):
            return _refuse(403, "missing or wrong CSRF token (X-CSRF-Token)")
        return None

    def _principal(self, request: Request) -> Principal | JSONResponse | None:
        if not accounts.any_users(self.store):
            if self.policy.open_when_no_users:
                return Principal("anonymous", Role.ADMIN, "open")
            if needed_role(request.method, request.url.path) is None:
                return None
            return _refuse(
                401, "no user exists: create one with `airouter users add NAME --role admin`"
            )
        return self.identify(request)


FORM_LIMIT = 16384  # a login, logout or user form is a few hundred bytes


async def small_body(request: Request, limit: int = FORM_LIMIT) -> bytes:
    """The body of a form or a small JSON request; 413 (HTTPException) past ``limit``
    bytes, read no further."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the request body is larger than {limit} bytes")
    return bytes(body)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _refuse(status: int, error: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="airouter"'} if status == 401 else None
    return JSONResponse({"error": error, "status": status}, status, headers=headers)


def _safe_next(target: str | None) -> str:
    """Only a path of this server (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/dashboard"
    return target


def login_router(gate: Gate) -> APIRouter:
    """The login page, sign-in (a session cookie) and sign-out."""
    app = APIRouter()

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str | None = None, error: str = "") -> Response:
        """The sign-in form, with a CSRF token in a cookie and the form (double submit)."""
        csrf = secrets.token_urlsafe(24)
        response = TEMPLATES.TemplateResponse(
            request,
            "login.html",
            {"csrf": csrf, "next": _safe_next(next), "error": error[:200], "principal": None},
        )
        _cookie(response, LOGIN_CSRF_COOKIE, csrf, gate.policy, 600)
        return response

    @app.post("/login")
    async def sign_in(request: Request) -> Response:
        """Check the form; a session cookie and a redirect, or the form again with why."""
        form = urllib.parse.parse_qs((await small_body(request)).decode("utf-8", "replace"))
        field = {k: v[0] for k, v in form.items() if v}
        target = _safe_next(field.get("next"))
        if not accounts.same_secret(field.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
            return _refuse(403, "missing or wrong CSRF token: load the login page again")
        name, password = field.get("username", ""), field.get("password", "")
        who = await run_in_threadpool(gate.login, name, password, _address(request), "session")
        if isinstance(who, JSONResponse):
            why = (
                "too many failed logins: wait"
                if who.status_code == 429
                else "wrong name or password"
            )
            page = f"/login?next={urllib.parse.quote(target)}&error={urllib.parse.quote(why)}"
            return RedirectResponse(page, 303)
        assert who.user_id is not None
        cookie, _ = await run_in_threadpool(
            accounts.open_session, gate.store, who.user_id, gate.policy.session_hours
        )
        await run_in_threadpool(gate._record, "login", who.name, f"from {_address(request)}")
        response = RedirectResponse(target, 303)
        _cookie(
            response, SESSION_COOKIE, cookie, gate.policy, int(gate.policy.session_hours * 3600)
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    @app.post("/logout")
    async def sign_out(request: Request) -> Response:
        """End the session (the form carries its CSRF token)."""
        who = getattr(request.state, "principal", None)
        form = urllib.parse.parse_qs((await small_body(request)).decode("utf-8", "replace"))
        token = (form.get("csrf") or [request.headers.get(CSRF_HEADER, "")])[0]
        cookie = request.cookies.get(SESSION_COOKIE)
        if who is not None and who.via == "session" and cookie:
            if not accounts.same_secret(token, who.csrf):
                return _refuse(403, "missing or wrong CSRF token")
            await run_in_threadpool(accounts.close_session, gate.store, cookie)
            await run_in_threadpool(gate._record, "logout", who.name, "")
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return app


def _cookie(response: Response, name: str, value: str, policy: AuthPolicy, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=policy.secure_cookies,
    )


def install(app: FastAPI, store: Store, policy: AuthPolicy) -> Gate:
    """Put the gate in front of every route of ``app``, with the login routes."""
    gate = Gate(store, policy)
    app.middleware("http")(gate)
    app.include_router(login_router(gate))
    return gate
