"""Which studies each open association (or STOW-RS request) has touched.

The receivers (``scp``) report what they store; completion (``router``) asks which studies are
still busy. It lives in the core because both stages use it and neither may import the other.
"""

from __future__ import annotations

import threading


class AssociationTracker:
    """Which studies each open association has touched; a study is busy while one is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}

    def touch(self, assoc_id: int, study_uid: str) -> None:
        """An association (or STOW-RS request) stored an instance of ``study_uid``."""
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(study_uid)

    def end(self, assoc_id: int) -> None:
        """The association ended: its studies are no longer busy because of it."""
        with self._lock:
            self._open.pop(assoc_id, None)

    def busy_studies(self) -> set[str]:
        """The studies some open association has touched."""
        with self._lock:
            return set().union(*self._open.values()) if self._open else set()
