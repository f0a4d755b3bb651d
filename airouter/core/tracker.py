"""Which studies each open association (or STOW-RS request) has touched.

The receivers (``scp``) report what they store; completion (``router``) asks which studies are
still busy. It lives in the core because both stages use it and neither may import the other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import delete, select

from airouter.core.db import Store, Transfer, utcnow
from airouter.core.leases import Identity

log = logging.getLogger(__name__)


class AssociationTracker:
    """Which studies each open association has touched; a study is busy while one is open.

    ``on_release`` is called (outside the lock) when an association that stored something
    ends: completion may then look at once rather than at its next poll (a study that
    completes on release is routed as soon as its sender lets go)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}
        self.on_release: Callable[[], None] | None = None

    def _released(self) -> None:
        if self.on_release is None:
            return
        try:
            self.on_release()
        except Exception:  # a wake-up lost: completion's next poll still sees the study
            log.exception("waking completion after an association ended failed")

    def touch(self, assoc_id: int, study_uid: str) -> None:
        """An association (or STOW-RS request) stored an instance of ``study_uid``."""
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(study_uid)

    def end(self, assoc_id: int) -> None:
        """The association ended: its studies are no longer busy because of it."""
        with self._lock:
            had = self._open.pop(assoc_id, None)
        if had:
            self._released()

    def busy_studies(self) -> set[str]:
        """The studies some open association has touched."""
        with self._lock:
            return set().union(*self._open.values()) if self._open else set()


class SharedTracker(AssociationTracker):
    """The same, shared by the nodes of one database: each (association, study) is also a
    row of ``transfers`` under this node's lease, so a study is busy while any live node is
    receiving it. A node that dies leaves rows that expire with its lease (see
    :func:`airouter.core.leases.release_transfers`)."""

    def __init__(self, store: Store, identity: Identity) -> None:
        super().__init__()
        self.store = store
        self.identity = identity

    def touch(self, assoc_id: int, study_uid: str) -> None:
        """As :meth:`AssociationTracker.touch`; the first touch of a study writes its row."""
        with self._lock:
            known = study_uid in self._open.get(assoc_id, set())
            self._open.setdefault(assoc_id, set()).add(study_uid)
        if not known:
            with self.store.session() as s:
                s.add(
                    Transfer(
                        owner=self.identity.owner,
                        conn=str(assoc_id),
                        study_uid=study_uid,
                        lease_until=self.identity.until(),
                    )
                )

    def end(self, assoc_id: int) -> None:
        """As :meth:`AssociationTracker.end`; its rows are removed."""
        with self._lock:
            had = self._open.pop(assoc_id, None)
        if had:
            with self.store.session() as s:
                s.execute(
                    delete(Transfer).where(
                        Transfer.owner == self.identity.owner, Transfer.conn == str(assoc_id)
                    )
                )
            self._released()

    def busy_studies(self) -> set[str]:
        """The studies some live node (this one included) is receiving."""
        with self.store.session() as s:
            rows = s.scalars(
                select(Transfer.study_uid).where(Transfer.lease_until > utcnow()).distinct()
            )
            shared = set(rows)
        return shared | super().busy_studies()
