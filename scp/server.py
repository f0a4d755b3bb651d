"""The DIMSE side of the node: a pynetdicom AE accepting C-ECHO and C-STORE (PS3.4 B).

Services other stages answer on the same port (the storage commitment reports that dispatch
waits for) are bound by the composition root as extra :class:`ExtraService` entries: the
receiver does not know what they do.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    dimse,
    dimse_messages,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from airouter.core.settings import ScpSettings
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import StoreStatus
from scp.ingest import Ingest, Outcome, Received
from scp.limits import TooLarge

log = logging.getLogger(__name__)


def handle_store(event: Any, ingest: Ingest, tracker: AssociationTracker) -> Dataset:
    """EVT_C_STORE: acknowledge only once the instance is durable and indexed.

    pynetdicom has already written the data set as received to a temporary file (chunked
    receive); only the header is parsed here, and the file is renamed into the spool. A
    deflated data set is measured before it is parsed (``Ingest.check_limits``).
    """
    path = Path(event.dataset_path)
    try:
        return _store(event, path, ingest, tracker)
    finally:
        path.unlink(missing_ok=True)  # refused (stored ones were moved into the spool)


def _store(event: Any, path: Path, ingest: Ingest, tracker: AssociationTracker) -> Dataset:
    assoc = event.assoc
    transfer_syntax = str(event.context.transfer_syntax)
    command_sop = str(event.request.AffectedSOPInstanceUID or "") or None
    try:
        ingest.check_limits(path, transfer_syntax)
        ds = dcmread(path, stop_before_pixels=True)
    except TooLarge as exc:
        outcome = Outcome(StoreStatus.OUT_OF_RESOURCES, str(exc))
    except Exception as exc:
        log.warning("assoc %s: cannot decode data set: %s", assoc.name, exc)
        return _status(StoreStatus.CANNOT_UNDERSTAND, f"cannot decode data set: {exc}")
    else:
        received = Received(
            path=path,
            transfer_syntax=transfer_syntax,
            command_sop_instance_uid=command_sop,
            command_sop_class_uid=str(event.request.AffectedSOPClassUID or "") or None,
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            source_address=assoc.requestor.address,
        )
        outcome = ingest.store_instance(ds, received)
    if outcome.status == StoreStatus.SUCCESS and outcome.study_uid:
        tracker.touch(id(assoc), outcome.study_uid)
    elif outcome.status != StoreStatus.SUCCESS:
        log.warning(
            "assoc %s: C-STORE of %s refused (0x%04X): %s",
            assoc.name,
            command_sop,
            outcome.status,
            outcome.reason,
        )
        ingest.store.record(
            "store_refused",
            {
                "sop_instance_uid": command_sop,
                "status": int(outcome.status),
                "reason": outcome.reason,
                "calling_ae": assoc.requestor.ae_title,
            },
        )
    return _status(outcome.status, outcome.reason)


def _status(status: StoreStatus, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if reason and status != StoreStatus.SUCCESS:
        ds.ErrorComment = reason[:64]  # LO
    return ds


def handle_end(event: Any, tracker: AssociationTracker) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: the association's studies may complete,
    and the temporary file of a data set cut off mid-transfer is removed (never
    acknowledged, it would stay in the incoming folder until the next start)."""
    tracker.end(id(event.assoc))
    _discard_partial(event.assoc)


def _discard_partial(assoc: Any) -> None:
    # pynetdicom keeps the message being received on its DIMSE provider (``dimse.message``,
    # reset once a message is complete) with the file it streams the data set to.
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    path = getattr(message, "_data_set_path", None)
    if isinstance(path, tuple):
        path = path[0]
    if path is None:
        return
    handle = getattr(message, "_data_set_file", None)
    with contextlib.suppress(OSError):
        if handle is not None:
            handle.close()
        Path(path).unlink(missing_ok=True)
        log.info("assoc %s ended mid-transfer: partial data set discarded", assoc.name)


def configure_pynetdicom(incoming_dir: Path) -> None:
    """Process-wide pynetdicom behaviour of a node that stores what it receives as received.

    - unrestricted storage: any storage, private or unknown SOP class is accepted, with the
      transfer syntax the sender proposed first (no transcoding forced on the modality);
    - chunked receive: each data set is streamed to a temporary file in ``incoming_dir`` (on
      the spool's filesystem, so moving it into the spool is a rename), never held in memory.
    """
    incoming_dir.mkdir(parents=True, exist_ok=True)
    for stale in incoming_dir.glob("*.dcm"):  # never acknowledged: a crash cut them off
        stale.unlink(missing_ok=True)
    # pynetdicom names no folder for the file: its temporary files (and only its) go to ours.
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
        tempfile.NamedTemporaryFile, dir=str(incoming_dir)
    )
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.STORE_RECV_CHUNKED_DATASET = True
    _guard_dimse_decoding()


def _guard_dimse_decoding() -> None:
    """A DIMSE message pynetdicom cannot decode (a C-STORE-RQ command without its Affected SOP
    Class UID, seen in fuzzing) raised inside its reactor thread, which died with the
    association still holding its slot until the sender gave up. Such a message now aborts
    the association (as pynetdicom does for a message it recognises as invalid) and its
    partial data set is removed. A small wrapper of one method, upstreamable as a try/except."""
    provider = dimse.DIMSEServiceProvider
    if getattr(provider.receive_primitive, "_airouter_guarded", False):
        return
    original = provider.receive_primitive

    def receive_primitive(self: Any, primitive: Any) -> None:
        try:
            original(self, primitive)
        except Exception as exc:
            name = getattr(self.assoc, "name", "?")
            log.warning(
                "assoc %s: undecodable DIMSE message (%s): aborted", name, type(exc).__name__
            )
            _discard_partial(self.assoc)
            self.message = None
            self.dul.event_queue.put("Evt19")

    receive_primitive._airouter_guarded = True  # type: ignore[attr-defined]
    provider.receive_primitive = receive_primitive  # type: ignore[method-assign]


@dataclass(frozen=True)
class ExtraService:
    """A DIMSE service another stage answers on our AE: the SOP class accepted (with the
    roles it is offered in) and the event handler bound to it."""

    sop_class: str
    event: Any  # a pynetdicom intervention or notification event
    handler: Callable[..., Any]
    args: Sequence[Any] = field(default_factory=tuple)
    scu_role: bool | None = None
    scp_role: bool | None = None


def build_ae(settings: ScpSettings, extra: Sequence[ExtraService] = ()) -> AE:
    """An AE that accepts Verification and every storage SOP class in every transfer syntax,
    plus the SOP classes of ``extra``."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.timeouts.acse_timeout_s
    ae.dimse_timeout = settings.timeouts.dimse_timeout_s
    ae.network_timeout = settings.timeouts.network_timeout_s
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.require_called_aet = settings.check_called_ae_title
    ae.add_supported_context(Verification)
    for service in extra:
        ae.add_supported_context(
            service.sop_class, scu_role=service.scu_role, scp_role=service.scp_role
        )
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


class AssociationGate:
    """Admits a connection to pynetdicom only once its whole A-ASSOCIATE-RQ has arrived.

    pynetdicom gives every connection an association thread and a slot at once, and reads the
    rest of a PDU with no deadline: 17 sockets that send the first 10 bytes of an
    A-ASSOCIATE-RQ, or nothing, held every slot. Here a connection waits in a gate thread of
    its own, without a slot, until the request is complete in the kernel's buffer (peeked,
    not consumed: pynetdicom then reads it at once), for at most ``deadline_s``; at most
    ``per_source`` connections of one address and ``total`` in all wait at a time, and any
    more are closed unanswered.
    """

    _POLL_S = 0.05
    _LARGEST_RQ = 64 * 1024  # an A-ASSOCIATE-RQ is a few kB; more is not one

    def __init__(self, deadline_s: float, per_source: int, total: int) -> None:
        self.deadline_s = deadline_s
        self.per_source = per_source
        self.total = total
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}

    def admit(self, sock: Any, address: str) -> bool:
        """Whether ``sock`` holds a complete A-ASSOCIATE-RQ (or another PDU pynetdicom will
        answer at once) within the deadline; False closes it unanswered."""
        with self._lock:
            if (
                self._waiting.get(address, 0) >= self.per_source
                or sum(self._waiting.values()) >= self.total
            ):
                return False
            self._waiting[address] = self._waiting.get(address, 0) + 1
        try:
            return self._complete_request(sock)
        except OSError:
            return False
        finally:
            with self._lock:
                self._waiting[address] -= 1
                if not self._waiting[address]:
                    del self._waiting[address]

    def _complete_request(self, sock: Any) -> bool:
        deadline = time.monotonic() + self.deadline_s
        needed = 6  # the PDU header: type, reserved, 4-byte length
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                return False
            data = sock.recv(self._LARGEST_RQ + 6, socket.MSG_PEEK)
            if not data:
                return False  # closed by the peer
            if len(data) >= 6 and needed == 6:
                needed = 6 + int.from_bytes(data[2:6], "big")
                if needed > self._LARGEST_RQ + 6:
                    return False
            if len(data) >= needed:
                return True
            time.sleep(self._POLL_S)  # part of it is here: wait for the rest


def _gated(server: ThreadedAssociationServer, gate: AssociationGate) -> None:
    """Put ``gate`` in front of the server's per-connection work (run in its own thread)."""
    finish = server.finish_request

    def finish_request(request: Any, client_address: Any) -> None:
        address = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if not isinstance(request, socket.socket) or isinstance(request, ssl.SSLSocket):
            finish(request, client_address)  # TLS: its handshake has its own timeout
            return
        if not gate.admit(request, address):
            log.info("connection from %s closed: no A-ASSOCIATE-RQ in time", address)
            server.shutdown_request(request)
            return
        finish(request, client_address)

    server.finish_request = finish_request  # type: ignore[method-assign]


def start_dimse(
    settings: ScpSettings,
    ingest: Ingest,
    tracker: AssociationTracker,
    incoming_dir: Path,
    extra: Sequence[ExtraService] = (),
) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server so the caller can shut it down.

    ``incoming_dir`` receives data sets while they arrive; it must lie on the spool's
    filesystem so that storing one is a rename.
    """
    configure_pynetdicom(incoming_dir)
    ae = build_ae(settings, extra)
    # socketserver's default listen backlog is 5: 100 connects took 15 s
    ThreadedAssociationServer.request_queue_size = settings.listen_backlog
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ingest, tracker]),
        *[(x.event, x.handler, list(x.args)) for x in extra],
        (evt.EVT_RELEASED, handle_end, [tracker]),
        (evt.EVT_ABORTED, handle_end, [tracker]),
        (evt.EVT_CONN_CLOSE, handle_end, [tracker]),
    ]
    server = ae.start_server(
        (settings.dimse_host, settings.dimse_port), block=False, evt_handlers=handlers
    )
    assert server is not None  # block=False returns the server
    gate = AssociationGate(
        settings.association_deadline_s, settings.max_pending_per_source, settings.max_pending
    )
    _gated(server, gate)
    if settings.allowed_source_networks:
        networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_source_networks]

        def verify_request(_request: Any, client_address: tuple[str, int]) -> bool:
            """Connections from outside the allowed networks are closed before any DICOM."""
            allowed = any(ipaddress.ip_address(client_address[0]) in net for net in networks)
            if not allowed:
                log.warning("connection from %s refused: not an allowed network", client_address[0])
            return allowed

        server.verify_request = verify_request  # type: ignore[method-assign,assignment]
    log.info(
        "DIMSE listening on %s:%s as %s",
        settings.dimse_host,
        server.server_address[1],
        settings.ae_title,
    )
    return server
