"""Users, API tokens and browser sessions of the HTTP server, in the state store.

Passwords are kept as argon2id hashes (argon2-cffi); tokens and session cookies are random
(256 bits) and only their SHA-256 is kept, so a copy of the database opens nothing. The CLI
(``airouter users|tokens``) and the HTTP server share these functions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, exists, func, select

from airouter.core.db import ApiToken, Event, Store, User, WebSession, utcnow
from airouter.core.vocab import Role

_HASHER = PasswordHasher()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
TOKEN_PREFIX = "air_"
MIN_PASSWORD = 8
# A failed password must cost as much as a good one: verify against this when no such user.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class AccountError(ValueError):
    """A user or token that cannot be made or found, with the reason."""


@dataclass(frozen=True)
class Principal:
    """Who is asking, and with what: ``via`` is token, basic, session or open (no users)."""

    name: str
    role: Role
    via: str
    user_id: int | None = None
    csrf: str | None = None  # the session's CSRF token (cookie-authenticated requests only)


def digest(secret: str) -> str:
    """The SHA-256 (hex) a token or cookie is kept as."""
    return hashlib.sha256(secret.encode()).hexdigest()


def any_users(store: Store) -> bool:
    """Whether a user exists: with none, the HTTP server is open (on loopback only)."""
    with store.session() as s:
        return bool(s.scalar(select(exists().where(User.id.is_not(None)))))


def add_user(store: Store, name: str, role: Role, password: str) -> None:
    """Create user ``name``; :class:`AccountError` for a taken name or a short password."""
    if not _NAME.match(name):
        raise AccountError(
            f"not a valid user name: {name[:70]!r} (letters, digits and . _ @ -, at most 64)"
        )
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    with store.session() as s:
        if s.scalar(select(User.id).where(func.lower(User.name) == name.lower())) is not None:
            raise AccountError(f"user {name!r} exists")
        s.add(User(name=name, role=role, password_hash=_HASHER.hash(password)))
        s.add(Event(kind="user_added", detail=f"user {name} as {role.value}", actor=name))


def remove_user(store: Store, name: str) -> None:
    """Remove user ``name`` with its tokens and sessions: they stop working at once."""
    with store.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise AccountError(f"no user {name!r}")
        s.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
        s.execute(delete(WebSession).where(WebSession.user_id == user.id))
        s.delete(user)
        s.add(Event(kind="user_removed", detail=f"user {name}", actor=name))


def set_password(store: Store, name: str, password: str) -> None:
    """Give user ``name`` a new password; their browser sessions end (tokens stay)."""
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    with store.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise AccountError(f"no user {name!r}")
        user.password_hash = _HASHER.hash(password)
        s.execute(delete(WebSession).where(WebSession.user_id == user.id))
        s.add(Event(kind="password_changed", detail=f"user {name}", actor=name))


def list_users(store: Store) -> list[tuple[str, Role, int]]:
    """Each user's name, role and number of tokens in force."""
    with store.session() as s:
        live = (
            select(func.count(ApiToken.id))
            .where(ApiToken.user_id == User.id, ApiToken.revoked_at.is_(None))
            .scalar_subquery()
        )
        rows = s.execute(select(User.name, User.role, live).order_by(User.name)).all()
        return [(str(n), Role(r), int(c)) for n, r, c in rows]


def create_token(store: Store, name: str, label: str) -> tuple[int, str]:
    """A new bearer token of user ``name``: its id and the token, shown this once."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise AccountError(f"no user {name!r}")
        token = ApiToken(user_id=user.id, label=label[:64] or "token", digest=digest(secret))
        s.add(token)
        s.flush()
        s.add(Event(kind="token_created", detail=f"token {token.id} ({token.label})", actor=name))
        return token.id, secret


def revoke_token(store: Store, token_id: int) -> None:
    """Revoke a token: the next request that carries it is refused."""
    with store.session() as s:
        token = s.get(ApiToken, token_id)
        if token is None or token.revoked_at is not None:
            raise AccountError(f"no token {token_id} in force")
        token.revoked_at = utcnow()
        user = s.get(User, token.user_id)
        s.add(
            Event(
                kind="token_revoked",
                detail=f"token {token_id} ({token.label})",
                actor=user.name if user else None,
            )
        )


def list_tokens(store: Store) -> list[tuple[int, str, str, str, bool]]:
    """Each token's id, user, label, creation time and whether it is in force."""
    with store.session() as s:
        rows = s.execute(
            select(ApiToken, User.name)
            .join(User, User.id == ApiToken.user_id)
            .order_by(ApiToken.id)
        ).all()
        return [
            (t.id, str(n), t.label, t.created_at.isoformat() + "Z", t.revoked_at is None)
            for t, n in rows
        ]


def by_token(store: Store, secret: str) -> Principal | None:
    """The user a bearer token belongs to, while it is in force."""
    with store.session() as s:
        row = s.execute(
            select(User)
            .join(ApiToken, ApiToken.user_id == User.id)
            .where(ApiToken.digest == digest(secret), ApiToken.revoked_at.is_(None))
        ).scalar_one_or_none()
        return None if row is None else Principal(row.name, row.role, "token", row.id)


class Passwords:
    """Checks name and password (argon2 takes tens of milliseconds: a client that sends the
    same basic credentials with every request is verified once a minute, not each time)."""

    def __init__(self, store: Store, remember_s: float = 60.0) -> None:
        self.store = store
        self.remember_s = remember_s
        self._lock = threading.Lock()
        self._verified: dict[str, tuple[str, float]] = {}  # key -> (stored hash, until)

    def check(self, name: str, password: str) -> Principal | None:
        """The user, if the password is theirs."""
        with self.store.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            stored = user.password_hash if user is not None else _DUMMY_HASH
            found = None if user is None else Principal(user.name, user.role, "basic", user.id)
        key = hashlib.sha256(f"{name}\0{password}".encode()).hexdigest()
        with self._lock:
            known = self._verified.get(key)
        if found is not None and known and known[0] == stored and known[1] > time.monotonic():
            return found
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if found is None:
            return None
        with self._lock:
            if len(self._verified) > 1024:
                self._verified.clear()
            self._verified[key] = (stored, time.monotonic() + self.remember_s)
        return found


def open_session(store: Store, user_id: int, hours: float) -> tuple[str, str]:
    """A new browser session: the cookie's value and its CSRF token."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        s.execute(delete(WebSession).where(WebSession.expires_at < now))
        s.add(
            WebSession(
                digest=digest(cookie),
                user_id=user_id,
                csrf=csrf,
                expires_at=now + timedelta(hours=hours),
            )
        )
    return cookie, csrf


def by_session(store: Store, cookie: str) -> Principal | None:
    """The user of a browser session that has not ended."""
    with store.session() as s:
        row = s.execute(
            select(User, WebSession.csrf)
            .join(WebSession, WebSession.user_id == User.id)
            .where(WebSession.digest == digest(cookie), WebSession.expires_at > utcnow())
        ).one_or_none()
        if row is None:
            return None
        user, csrf = row
        return Principal(user.name, user.role, "session", user.id, csrf)


def close_session(store: Store, cookie: str) -> None:
    """End a browser session (sign out)."""
    with store.session() as s:
        s.execute(delete(WebSession).where(WebSession.digest == digest(cookie)))


def same_secret(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two secrets (False if either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def recent_failures(store: Store, name: str, address: str, window_s: float) -> int:
    """Failed logins in the last ``window_s`` for this user name or from this address (the
    audit trail's ``login_failed`` events, so every process of every node counts them)."""
    since = utcnow() - timedelta(seconds=window_s)
    with store.session() as s:
        return int(
            s.scalar(
                select(func.count(Event.id)).where(
                    Event.kind == "login_failed",
                    Event.at >= since,
                    (Event.actor == name[:64]) | (Event.detail == f"from {address}"),
                )
            )
            or 0
        )
