"""The rules in force, reloaded when their files change, without a restart.

A broken edit is rejected: the previous rules stay in force and the error (file:line: key) is
kept for the API and logged. Readers get an immutable list; a reload swaps the reference.

The node keeps a copy of the files in force (``in_force``: a link to the last accepted
version); its worker processes read the same directory as followers, and one that starts
while the files hold a rejected edit takes the node's copy, so that it applies the rules the
node applies and reports the same error.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.rules import Rule, RuleError, load_rules

log = logging.getLogger(__name__)

Validator = Callable[[Sequence[Rule]], None]  # raises RuleError for rules the node cannot run


class RuleSet:
    """The rules of a directory, validated, swapped whole when an edit is valid."""

    def __init__(
        self,
        directory: Path,
        validate: Validator | None = None,
        in_force: Path | None = None,
        follow: bool = False,
    ) -> None:
        """``in_force``: where the node keeps the files in force, or (``follow``) where a
        follower finds them; a follower logs reloads and rejections at debug only (its node
        reports them)."""
        self.directory = directory
        self.validate = validate
        self.in_force = in_force
        self.follow = follow
        self._level = (logging.DEBUG,) * 2 if follow else (logging.INFO, logging.ERROR)
        self.error: str | None = None
        self.loaded_at: datetime | None = None
        self._lock = threading.Lock()
        self._signature = self._current_signature()
        try:
            self._rules: tuple[Rule, ...] = tuple(self._load(self.directory))
        except RuleError as exc:  # at start-up an error is fatal, but to a follower
            if not (follow and in_force is not None and in_force.is_dir()):
                raise
            self._rules = tuple(self._load(in_force))
            self.error = str(exc)
        else:
            self._keep(self._signature)
        self.loaded_at = datetime.now(UTC)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in force (an immutable tuple; a reload replaces it)."""
        return self._rules

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        if not self.directory.is_dir():
            return ()
        return tuple(
            sorted(
                (p.name, p.stat().st_mtime_ns, p.stat().st_size)
                for p in self.directory.glob("*.yaml")
            )
        )

    def _load(self, directory: Path) -> list[Rule]:
        rules = load_rules(directory)
        if self.validate is not None:
            self.validate(rules)
        return rules

    def _keep(self, signature: tuple[tuple[str, int, int], ...]) -> None:
        """The node: copy the files just accepted beside ``in_force`` and point the link at
        the copy (one rename: a follower sees the old set or the new). Not when the files
        changed since they were read: the next check reloads them."""
        if self.in_force is None or self.follow:
            return
        parent, name = self.in_force.parent, self.in_force.name
        version = parent / f"{name}.{time.time_ns()}"
        try:
            version.mkdir(parents=True)
            for path in self.directory.glob("*.yaml"):
                shutil.copy2(path, version / path.name)
            if self._current_signature() != signature:
                shutil.rmtree(version)
                return
            link = parent / f".{name}.link"
            link.unlink(missing_ok=True)
            link.symlink_to(version.name)
            os.replace(link, self.in_force)
        except OSError as exc:  # the rules stay in force; a worker starting now may not start
            log.warning("could not keep a copy of the rules in force in %s: %s", parent, exc)
            return
        for old in parent.glob(f"{name}.*"):
            if old != version and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)

    def check(self) -> bool:
        """Reload when the files changed; True when something changed (loaded or rejected)."""
        with self._lock:
            signature = self._current_signature()
            if signature == self._signature:
                return False
            self._signature = signature
            try:
                rules = self._load(self.directory)
            except RuleError as exc:
                self.error = str(exc)
                log.log(
                    self._level[1], "rule change rejected, previous rules stay in force:\n%s", exc
                )
                return True
            self._rules = tuple(rules)
            self.error = None
            self.loaded_at = datetime.now(UTC)
            self._keep(signature)
            log.log(self._level[0], "rules reloaded: %s", ", ".join(r.name for r in rules))
            return True

    def status(self) -> dict[str, Any]:
        """The rules in force, when they were loaded and the last rejected edit (for the API)."""
        return {
            "directory": str(self.directory),
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "error": self.error,
            "rules": [
                {
                    "name": r.name,
                    "order": r.order,
                    "enabled": r.enabled,
                    "action": r.action.value,
                    "priority": r.priority.value,
                    "stop": r.stop,
                    "fallback": r.fallback,
                    "models": r.models,
                    "destinations": r.destinations,
                    "file": r.file,
                }
                for r in self._rules
            ],
        }
