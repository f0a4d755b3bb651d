"""The rules in force, reloaded when their files change, without a restart.

A broken edit is rejected: the previous rules stay in force and the error (file:line: key) is
kept for the API and logged. Readers get an immutable list; a reload swaps the reference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.rules import Rule, RuleError, load_rules

log = logging.getLogger(__name__)

Validator = Callable[[Sequence[Rule]], None]  # raises RuleError for rules the node cannot run


class RuleSet:
    """The rules of a directory, validated, swapped whole when an edit is valid."""

    def __init__(self, directory: Path, validate: Validator | None = None) -> None:
        self.directory = directory
        self.validate = validate
        self.error: str | None = None
        self.loaded_at: datetime | None = None
        self._lock = threading.Lock()
        self._signature = self._current_signature()
        self._rules: tuple[Rule, ...] = tuple(self._load())  # at start-up an error is fatal
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

    def _load(self) -> list[Rule]:
        rules = load_rules(self.directory)
        if self.validate is not None:
            self.validate(rules)
        return rules

    def check(self) -> bool:
        """Reload when the files changed; True when something changed (loaded or rejected)."""
        with self._lock:
            signature = self._current_signature()
            if signature == self._signature:
                return False
            self._signature = signature
            try:
                rules = self._load()
            except RuleError as exc:
                self.error = str(exc)
                log.error("rule change rejected, previous rules stay in force:\n%s", exc)
                return True
            self._rules = tuple(rules)
            self.error = None
            self.loaded_at = datetime.now(UTC)
            log.info("rules reloaded: %s", ", ".join(r.name for r in rules))
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
                }
                for r in self._rules
            ],
        }
