"""User administration over HTTP, for the ``admin`` role: users and their tokens (what
``airouter users`` and ``airouter tokens`` do on the host). Bodies are JSON or a form."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from airouter.app import accounts
from airouter.app.web.auth import small_body
from airouter.core.db import Store
from airouter.core.vocab import Role


async def _fields(request: Request) -> dict[str, str]:
    """The request's fields, from JSON or a form (the dashboard's)."""
    body = await small_body(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise HTTPException(400, f"the body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return {str(k): str(v) for k, v in data.items()}
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    return {k: v[0] for k, v in form.items() if v}


def users_router(store: Store) -> APIRouter:
    """``/api/users`` and ``/api/tokens`` (admin only: see ``auth.needed_role``)."""
    app = APIRouter(prefix="/api")

    @app.get("/users")
    def list_users() -> list[dict[str, Any]]:
        """Each user, their role and how many tokens they hold in force."""
        return [{"name": n, "role": r.value, "tokens": t} for n, r, t in accounts.list_users(store)]

    @app.post("/users", status_code=201)
    async def add_user(request: Request) -> dict[str, Any]:
        """Add a user: ``name``, ``role`` (viewer, operator, admin), ``password``."""
        fields = await _fields(request)
        try:
            role = Role(fields.get("role", ""))
        except ValueError as exc:
            raise HTTPException(400, "role must be viewer, operator or admin") from exc
        name = fields.get("name", "")
        try:
            await run_in_threadpool(
                accounts.add_user, store, name, role, fields.get("password", "")
            )
        except accounts.AccountError as exc:
            raise HTTPException(409 if "exists" in str(exc) else 400, str(exc)) from exc
        return {"name": name, "role": role.value, "message": f"user {name} added as {role.value}"}

    @app.delete("/users/{name}")
    def remove_user(name: str) -> dict[str, Any]:
        """Remove a user with their tokens and sessions; never the last admin."""
        users = accounts.list_users(store)
        admins = [n for n, r, _ in users if r is Role.ADMIN]
        if admins == [name]:
            raise HTTPException(409, "the last admin cannot be removed (add another first)")
        try:
            accounts.remove_user(store, name)
        except accounts.AccountError as exc:
            raise HTTPException(404, str(exc)) from exc
        return {"name": name, "message": f"user {name} removed"}

    @app.get("/tokens")
    def list_tokens() -> list[dict[str, Any]]:
        """Every token: id, user, label, when made, in force or revoked (never the token)."""
        return [
            {"id": i, "user": u, "label": label, "created_at": c, "in_force": live}
            for i, u, label, c, live in accounts.list_tokens(store)
        ]

    @app.post("/users/{name}/tokens", status_code=201)
    async def create_token(request: Request, name: str) -> JSONResponse:
        """A new token of user ``name`` (``label``): the answer is the only time it shows."""
        fields = await _fields(request)
        try:
            token_id, secret = await run_in_threadpool(
                accounts.create_token, store, name, fields.get("label", "token")
            )
        except accounts.AccountError as exc:
            raise HTTPException(404, str(exc)) from exc
        message = f"token {token_id} of {name}: {secret} (shown once: copy it now)"
        return JSONResponse(
            {"id": token_id, "token": secret, "message": message},
            201,
            headers={"Cache-Control": "no-store"},
        )

    @app.post("/tokens/{token_id}/revoke")
    def revoke_token(token_id: int) -> dict[str, Any]:
        """Revoke a token: the next request that carries it is refused."""
        try:
            accounts.revoke_token(store, token_id)
        except accounts.AccountError as exc:
            raise HTTPException(404, str(exc)) from exc
        return {"id": token_id, "message": f"token {token_id} revoked"}

    return app
