"""``airouter users add | list | password | remove`` and ``airouter tokens create | list | revoke``.

They work on the node's state store (the settings name it: ``--config``, ``--data-dir``,
``--database-url``), so they run where the node's configuration is, whether the node runs or
not; what they change holds at once for every process of every node on that database.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from airouter.app import accounts
from airouter.core.db import Store
from airouter.core.settings import load_settings
from airouter.core.vocab import Role


def _store(args: argparse.Namespace) -> Store:
    flags: dict[str, object] = {}
    if args.data_dir:
        flags["data_dir"] = args.data_dir
    if args.database_url:
        flags["database_url"] = args.database_url
    settings = load_settings(args.config, **flags)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Store(settings.db_url)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise accounts.AccountError("the two passwords differ")
    return first


def _run(action: str, args: argparse.Namespace) -> int:
    try:
        store = _store(args)
        if action == "users add":
            accounts.add_user(store, args.name, Role(args.role), _password(args))
            print(f"user {args.name} added as {args.role}")
        elif action == "users password":
            accounts.set_password(store, args.name, _password(args))
            print(f"password of {args.name} changed; their dashboard sessions ended")
        elif action == "users remove":
            accounts.remove_user(store, args.name)
            print(f"user {args.name} removed, with their tokens and sessions")
        elif action == "users list":
            for name, role, tokens in accounts.list_users(store):
                print(f"{name:<32} {role.value:<9} {tokens} token(s)")
        elif action == "tokens create":
            token_id, secret = accounts.create_token(store, args.user, args.label)
            print(
                f"token {token_id} for {args.user} (shown once; keep it secret):", file=sys.stderr
            )
            print(secret)
        elif action == "tokens revoke":
            accounts.revoke_token(store, args.id)
            print(f"token {args.id} revoked")
        elif action == "tokens list":
            for token_id, user, label, created, live in accounts.list_tokens(store):
                state = "in force" if live else "revoked"
                print(f"{token_id:>5} {user:<32} {label:<24} {created} {state}")
    except accounts.AccountError as exc:
        print(f"airouter: {exc}", file=sys.stderr)
        return 1
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the node's YAML settings (AIROUTER_CONFIG)")
    p.add_argument("--data-dir", type=Path, help="the node's data directory (AIROUTER_DATA_DIR)")
    p.add_argument("--database-url", help="the node's state store (AIROUTER_DATABASE_URL)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``users`` and ``tokens`` sub-commands."""
    users = sub.add_parser("users", help="who may use the HTTP server and the dashboard")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="add a user (the password from a prompt or stdin)")
    add.add_argument("name")
    add.add_argument("--role", choices=[r.value for r in Role], required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    remove = users_sub.add_parser("remove", help="remove a user, their tokens and sessions")
    remove.add_argument("name")
    password = users_sub.add_parser("password", help="set a user's password (sessions end)")
    password.add_argument("name")
    password.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    listing = users_sub.add_parser("list", help="the users and their roles")
    user_actions = (
        (add, "users add"),
        (remove, "users remove"),
        (password, "users password"),
        (listing, "users list"),
    )
    for p, action in user_actions:
        _common(p)
        p.set_defaults(func=lambda args, action=action: _run(action, args))

    tokens = sub.add_parser("tokens", help="bearer tokens for machines and the CLI")
    tokens_sub = tokens.add_subparsers(dest="action", required=True)
    create = tokens_sub.add_parser("create", help="a new token of a user (printed once)")
    create.add_argument("user")
    create.add_argument("--label", default="token", help="what it is for (PACS, CI ...)")
    revoke = tokens_sub.add_parser("revoke", help="revoke a token: it stops working at once")
    revoke.add_argument("id", type=int)
    listing = tokens_sub.add_parser("list", help="the tokens, in force or revoked")
    for p, action in (
        (create, "tokens create"),
        (revoke, "tokens revoke"),
        (listing, "tokens list"),
    ):
        _common(p)
        p.set_defaults(func=lambda args, action=action: _run(action, args))
