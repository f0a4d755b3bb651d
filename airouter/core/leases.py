"""Several nodes on one database: who works on what, for how long.

A node claims a job or a delivery with a lease: its owner ("<node name>/<instance>") and an
expiry, renewed by the node's heartbeat while it lives. A node that dies stops renewing; once
its leases expire, any node takes the work over. A node registers under its name at start:
the name of a live node cannot be taken twice, and a restarted node recognises what its
previous run left in flight (same name, same host, that process gone) and takes it back at
once instead of waiting for the leases to expire.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, update

from airouter.core.db import Delivery, Job, Node, Store, Transfer, utcnow
from airouter.core.vocab import DeliveryState, JobState

log = logging.getLogger(__name__)


class NodeNameInUse(RuntimeError):
    """Another live node works on this database under the same name."""


@dataclass(frozen=True)
class Identity:
    """This run of this node: its name (configured; the host name by default) and a new
    instance id per start."""

    name: str
    lease_s: float
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def owner(self) -> str:
        """What the lease columns hold for this run."""
        return f"{self.name}/{self.instance}"

    def until(self) -> datetime:
        """The expiry of a lease taken or renewed now."""
        return utcnow() + timedelta(seconds=self.lease_s)


def expired(model: Any) -> ColumnElement[bool]:
    """Rows of ``model`` (Job, Delivery or Transfer) whose lease has run out, or that never
    had one (a database from before leases)."""
    return or_(model.lease_until.is_(None), model.lease_until < utcnow())


def register(store: Store, identity: Identity) -> list[str]:
    """Record this node as alive; returns the owners of its previous run (same name), whose
    leases it may take back at once. Raises :class:`NodeNameInUse` when a live node holds
    the name (its heartbeat is fresh, and it is not a dead process of this host)."""
    host, pid = socket.gethostname(), os.getpid()
    with store.session() as s:
        row = s.get(Node, identity.name, with_for_update=True)
        previous: list[str] = []
        if row is not None:
            fresh = row.heartbeat_at > utcnow() - timedelta(seconds=identity.lease_s)
            # on this host, its process is gone, or it had our pid (a container restarted)
            dead_here = row.host == host and (row.pid == pid or not _alive(row.pid))
            if fresh and not dead_here:
                raise NodeNameInUse(
                    f"a node named {identity.name!r} is running (on {row.host}, pid {row.pid}, "
                    f"alive {int((utcnow() - row.heartbeat_at).total_seconds())} s ago): give "
                    "each node its own node_name"
                )
            previous.append(f"{identity.name}/{row.instance}")
            row.instance, row.host, row.pid = identity.instance, host, pid
            row.started_at = row.heartbeat_at = utcnow()
        else:
            s.add(Node(name=identity.name, instance=identity.instance, host=host, pid=pid))
    return previous


def heartbeat(store: Store, identity: Identity) -> None:
    """Say this node is alive and extend every lease it holds."""
    until = identity.until()
    with store.session() as s:
        s.execute(
            update(Node)
            .where(Node.name == identity.name, Node.instance == identity.instance)
            .values(heartbeat_at=utcnow())
        )
        in_flight = [st for st in JobState if st.in_flight]
        s.execute(
            update(Job)
            .where(Job.lease_owner == identity.owner, Job.state.in_(in_flight))
            .values(lease_until=until)
        )
        s.execute(
            update(Delivery)
            .where(Delivery.lease_owner == identity.owner, Delivery.state == DeliveryState.SENDING)
            .values(lease_until=until)
        )
        s.execute(
            update(Transfer).where(Transfer.owner == identity.owner).values(lease_until=until)
        )


def release_transfers(store: Store, owners: list[str] | None = None) -> list[str]:
    """Transfers of a node that died mid-way (their lease expired, or ``owners``: the previous
    run of this node) are forgotten; returns the studies they were receiving, which may be
    partial."""
    with store.session() as s:
        gone = or_(expired(Transfer), Transfer.owner.in_(owners or []))
        studies = set(s.scalars(delete(Transfer).where(gone).returning(Transfer.study_uid)))
    return sorted(studies)


def others_alive(store: Store, identity: Identity) -> bool:
    """Whether another node of this database said it was alive within its lease."""
    since = utcnow() - timedelta(seconds=identity.lease_s)
    with store.session() as s:
        return (
            s.scalar(
                select(func.count())
                .select_from(Node)
                .where(
                    Node.name != identity.name,
                    Node.name.not_like(f"{identity.name}-r%"),  # its own receiver processes
                    Node.heartbeat_at > since,
                )
            )
            or 0
        ) > 0


def release_deliveries(store: Store, owners: list[str] | None = None) -> list[int]:
    """Deliveries left SENDING by a node that died (its lease expired, or ``owners``, the
    previous run of this node): due again now. Returns their ids."""
    with store.session() as s:
        taken = or_(expired(Delivery), Delivery.lease_owner.in_(owners or []))
        ids = list(
            s.scalars(
                update(Delivery)
                .where(Delivery.state == DeliveryState.SENDING, taken)
                .values(
                    state=DeliveryState.FAILED,
                    next_attempt_at=utcnow(),
                    lease_owner=None,
                    lease_until=None,
                    last_status="the node sending it stopped: sent again",
                )
                .returning(Delivery.id)
            )
        )
    if ids:
        log.info("deliveries %s: their node stopped, due again", ids)
    return ids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
