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
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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

from airouter.core import metrics
from airouter.core.settings import ScpSettings, ScpTlsSettings
from airouter.core.spool import fsync_file
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import Source, StoreStatus
from scp.header import index_header
from scp.ingest import Ingest, Outcome, Received, count_outcome
from scp.limits import TooLarge
from scp.native import NativeAcceptor, NativeLimits, StoreRequest
from scp.transport import UNLIMITED_PDU_CAP, AssociationGate, guard_connections

log = logging.getLogger(__name__)

# fsyncs of received data sets, one thread per association that may wait on one
_FSYNC = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")

# The attribute of our AE that holds the DIMSE message deadline (``_guard_dimse_decoding``).
MESSAGE_DEADLINE_ATTR = "airouter_message_deadline_s"


def handle_store(event: Any, ingest: Ingest, tracker: AssociationTracker) -> Dataset:
    """EVT_C_STORE (pynetdicom's path): acknowledge only once the instance is durable and
    indexed.

    pynetdicom has already written the data set as received to a temporary file (chunked
    receive); :func:`store_received` does the rest.
    """
    assoc = event.assoc
    request = StoreRequest(
        path=Path(event.dataset_path),
        transfer_syntax=str(event.context.transfer_syntax),
        sop_class_uid=str(event.request.AffectedSOPClassUID or "") or None,
        sop_instance_uid=str(event.request.AffectedSOPInstanceUID or "") or None,
        calling_ae=assoc.requestor.ae_title,
        called_ae=assoc.acceptor.ae_title,
        address=assoc.requestor.address,
        label=assoc.name,
        assoc_id=id(assoc),
    )
    try:
        return _status(*store_received(request, ingest, tracker))
    finally:
        request.path.unlink(missing_ok=True)  # refused (stored ones were moved into the spool)


def store_received(
    request: StoreRequest, ingest: Ingest, tracker: AssociationTracker
) -> tuple[StoreStatus, str]:
    """A received data set (a temporary DICOM file) made durable and indexed, or refused:
    the status to answer and why. Only the header is parsed; the file is renamed into the
    spool. A deflated data set is measured before it is parsed (``Ingest.check_limits``)."""
    path = request.path
    # The data set's fsync (most of the durable write) runs while its header is read and its
    # rows written: they wait on different things (the disk, the CPU).
    synced = _FSYNC.submit(fsync_file, path)

    def whole_header() -> Dataset:
        return dcmread(path, stop_before_pixels=True)

    try:
        ingest.check_limits(path, request.transfer_syntax)
        # the attributes the index needs of an instance of a series it has; all of them
        # (pydicom) for a new series, or where the quick read does not follow the encoding
        ds = index_header(path, request.transfer_syntax)
        full: Callable[[], Dataset] | None = whole_header
        if ds is None:
            ds, full = whole_header(), None
    except TooLarge as exc:
        outcome = Outcome(StoreStatus.OUT_OF_RESOURCES, str(exc))
        count_outcome(outcome.status, request.calling_ae, Source.DIMSE)
    except Exception as exc:
        log.warning("assoc %s: cannot decode data set: %s", request.label, exc)
        count_outcome(StoreStatus.CANNOT_UNDERSTAND, request.calling_ae, Source.DIMSE)
        return StoreStatus.CANNOT_UNDERSTAND, f"cannot decode data set: {exc}"
    else:
        received = Received(
            path=path,
            transfer_syntax=request.transfer_syntax,
            command_sop_instance_uid=request.sop_instance_uid,
            command_sop_class_uid=request.sop_class_uid,
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            source_address=request.address,
            synced=synced,
        )
        outcome = ingest.store_instance(ds, received, full)
    if outcome.status == StoreStatus.SUCCESS and outcome.study_uid:
        tracker.touch(request.assoc_id, outcome.study_uid)
    elif outcome.status != StoreStatus.SUCCESS:
        log.warning(
            "assoc %s: C-STORE of %s refused (0x%04X): %s",
            request.label,
            request.sop_instance_uid,
            outcome.status,
            outcome.reason,
        )
        ingest.store.record(
            "store_refused",
            {
                "sop_instance_uid": request.sop_instance_uid,
                "status": int(outcome.status),
                "reason": outcome.reason,
                "calling_ae": request.calling_ae,
            },
        )
    return outcome.status, outcome.reason


def _status(status: StoreStatus, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if reason and status != StoreStatus.SUCCESS:
        ds.ErrorComment = reason[:64]  # LO
    return ds


_COUNTED = "airouter_counted"  # the gauge of open associations an association counts in


def handle_established(event: Any, tls: bool) -> None:
    """EVT_ESTABLISHED: one more association open (the metrics)."""
    gauge = metrics.OPEN_ASSOCIATIONS.labels("pynetdicom", "yes" if tls else "no")
    setattr(event.assoc, _COUNTED, gauge)
    gauge.inc()


def handle_end(event: Any, tracker: AssociationTracker) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: the association's studies may complete,
    and the temporary file of a data set cut off mid-transfer is removed (never
    acknowledged, it would stay in the incoming folder until the next start)."""
    tracker.end(id(event.assoc))
    gauge = getattr(event.assoc, _COUNTED, None)
    if gauge is not None:  # once, whichever of the events comes first
        setattr(event.assoc, _COUNTED, None)
        gauge.dec()
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
    """Two guards around pynetdicom's assembly of DIMSE messages from P-DATA (one wrapped
    method, upstreamable as a try/except and a timer):

    - a message pynetdicom cannot decode (a C-STORE-RQ command without its Affected SOP Class
      UID, seen in fuzzing) raised inside its reactor thread, which died with the association
      still holding its slot until the sender gave up;
    - a message may take at most the AE's ``message_deadline_s`` from its first fragment to
      its last (a peer trickling one small PDU a minute held its slot forever).

    Either aborts the association (as pynetdicom does for a message it recognises as invalid)
    and removes the partial data set.
    """
    provider = dimse.DIMSEServiceProvider
    if getattr(provider.receive_primitive, "_airouter_guarded", False):
        return
    original = provider.receive_primitive

    def abort(self: Any, why: str) -> None:
        log.warning("assoc %s: %s: aborted", getattr(self.assoc, "name", "?"), why)
        _discard_partial(self.assoc)
        self.message = None
        self._airouter_started = None
        self.dul.event_queue.put("Evt19")

    def receive_primitive(self: Any, primitive: Any) -> None:
        deadline = getattr(self.assoc.ae, MESSAGE_DEADLINE_ATTR, None)
        started = getattr(self, "_airouter_started", None)
        if deadline and started is not None and time.monotonic() - started > deadline:
            abort(self, f"DIMSE message not complete within {deadline:g} s")
            return
        try:
            original(self, primitive)
        except Exception as exc:
            abort(self, f"undecodable DIMSE message ({type(exc).__name__})")
            return
        if self.message is None:
            self._airouter_started = None  # complete (or none begun)
        elif started is None:
            self._airouter_started = time.monotonic()

    receive_primitive._airouter_guarded = True  # type: ignore[attr-defined]
    provider.receive_primitive = receive_primitive  # type: ignore[method-assign]


_ADOPTED = threading.local()  # the listening socket a server being built takes


def _adopt_listeners() -> None:
    """Let a server take a listening socket made by the caller instead of binding one: the
    node's processes accept from one socket, a queue they share. The process that calls
    accept first takes the connection, and a process busy with its associations comes
    second (its accepting thread waits for the GIL), so associations spread by load; with
    ``SO_REUSEPORT`` the kernel hashed them over the processes, eight of ten on one and two
    on the other. A shared socket is never shut down by one process (that would end it for
    all): closing drops this process's descriptor only."""
    if getattr(ThreadedAssociationServer.server_bind, "_airouter_adopts", False):
        return
    bind, activate = (
        ThreadedAssociationServer.server_bind,
        ThreadedAssociationServer.server_activate,
    )
    close = ThreadedAssociationServer.server_close

    def server_bind(self: Any) -> None:
        sock = getattr(_ADOPTED, "sock", None)
        if sock is None:
            bind(self)
            return
        self.socket.close()
        self.socket, self.server_address = sock, sock.getsockname()
        self.airouter_shared = True

    def server_activate(self: Any) -> None:
        if not getattr(self, "airouter_shared", False):
            activate(self)

    def server_close(self: Any) -> None:
        if getattr(self, "airouter_shared", False):
            self.socket.close()
        else:
            close(self)

    server_bind._airouter_adopts = True  # type: ignore[attr-defined]
    ThreadedAssociationServer.server_bind = server_bind  # type: ignore[method-assign]
    ThreadedAssociationServer.server_activate = server_activate  # type: ignore[method-assign]
    ThreadedAssociationServer.server_close = server_close  # type: ignore[method-assign]


def _native_acceptor(
    settings: ScpSettings,
    ae: AE,
    extra: Sequence[ExtraService],
    incoming_dir: Path,
    ingest: Ingest,
    tracker: AssociationTracker,
) -> NativeAcceptor | None:
    """The acceptor that serves C-ECHO / C-STORE associations itself (``scp.receiver:
    native``, the default), with the same contexts, titles and limits as ``ae``."""
    if settings.receiver != "native":
        return None
    timeouts = settings.timeouts
    limits = NativeLimits(
        ae_title=settings.ae_title,
        maximum_pdu_size=settings.maximum_pdu_size,
        pdu_cap=settings.maximum_pdu_size or UNLIMITED_PDU_CAP,
        pdu_deadline_s=settings.pdu_deadline_s,
        message_deadline_s=settings.message_deadline_s,
        idle_timeout_s=timeouts.network_timeout_s,
        max_associations=settings.max_associations,
        require_calling_aet=list(settings.allowed_calling_ae_titles),
        require_called_aet=settings.check_called_ae_title,
        implementation_class_uid=str(ae.implementation_class_uid),
        implementation_version_name=str(ae.implementation_version_name or ""),
    )
    return NativeAcceptor(
        limits,
        ae.supported_contexts,
        {str(x.sop_class) for x in extra},
        incoming_dir,
        functools.partial(store_received, ingest=ingest, tracker=tracker),
        tracker.end,
    )


def _close_native_on_shutdown(server: ThreadedAssociationServer, native: NativeAcceptor) -> None:
    shutdown = server.shutdown

    def shutdown_all() -> None:
        # first: the server's close joins the connection threads, ours among them
        native.close_all()
        shutdown()

    server.shutdown = shutdown_all  # type: ignore[method-assign]


def open_associations(server: ThreadedAssociationServer) -> int:
    """The associations a server started by :func:`start_dimse` holds, on either path."""
    native: NativeAcceptor | None = getattr(server, "airouter_native", None)
    return len(server.ae.active_associations) + (native.count() if native is not None else 0)


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
    setattr(ae, MESSAGE_DEADLINE_ATTR, settings.message_deadline_s)
    ae.add_supported_context(Verification)
    for service in extra:
        ae.add_supported_context(
            service.sop_class, scu_role=service.scu_role, scp_role=service.scp_role
        )
    # A C-GET requestor proposes the storage SOP classes with itself as SCP (role selection):
    # accepted, so the instances go back to it on its association. Without role selection
    # the usual roles hold (the sender is the SCU).
    getting = any(s.event is evt.EVT_C_GET for s in extra)
    roles = {"scu_role": True, "scp_role": True} if getting else {}
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, **roles)
    return ae


def tls_server_context(tls: ScpTlsSettings) -> ssl.SSLContext:
    """The TLS context of the DICOM TLS port: our certificate; with a CA file, a client
    certificate that CA signed is required (PS3.15 B.1, BCP 195)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _handshake_per_connection(server: ThreadedAssociationServer, timeout_s: float) -> None:
    """pynetdicom completes the TLS handshake in its accepting thread, where a client that
    stalls it would hold every other connection back: the handshake moves into the
    connection's own thread, with a deadline, and a failed one (an unknown CA) is logged."""
    context = server.ssl_context
    assert context is not None
    server.ssl_context = None  # its get_request must not wrap the socket

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = cast(socket.socket, server.socket).accept()
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    finish = server.finish_request

    def finish_request(request: Any, client_address: Any) -> None:
        try:
            request.settimeout(timeout_s)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as exc:
            log.warning("DICOM TLS connection from %s refused: %s", client_address[0], exc)
            server.shutdown_request(request)
            return
        finish(request, client_address)

    server.get_request = get_request  # type: ignore[method-assign]
    server.finish_request = finish_request  # type: ignore[method-assign]


def start_dimse(
    settings: ScpSettings,
    ingest: Ingest,
    tracker: AssociationTracker,
    incoming_dir: Path,
    extra: Sequence[ExtraService] = (),
    listener: socket.socket | None = None,
    tls: ScpTlsSettings | None = None,
) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server so the caller can shut it down.

    ``incoming_dir`` receives data sets while they arrive; it must lie on the spool's
    filesystem so that storing one is a rename. ``listener``: a listening socket to accept
    from (shared by the node's processes, non-blocking) instead of binding one. ``tls``:
    serve DICOM TLS on its port instead (pynetdicom serves those associations).
    """
    configure_pynetdicom(incoming_dir)
    _adopt_listeners()
    ae = build_ae(settings, extra)
    # socketserver's default listen backlog is 5: 100 connects took 15 s
    ThreadedAssociationServer.request_queue_size = settings.listen_backlog
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ingest, tracker]),
        *[(x.event, x.handler, list(x.args)) for x in extra],
        (evt.EVT_ESTABLISHED, handle_established, [tls is not None]),
        (evt.EVT_RELEASED, handle_end, [tracker]),
        (evt.EVT_ABORTED, handle_end, [tracker]),
        (evt.EVT_CONN_CLOSE, handle_end, [tracker]),
    ]
    _ADOPTED.sock = listener
    port = tls.port if tls is not None else settings.dimse_port
    try:
        server = ae.start_server(
            (settings.dimse_host, port),
            block=False,
            evt_handlers=handlers,
            ssl_context=tls_server_context(tls) if tls is not None else None,
        )
    finally:
        _ADOPTED.sock = None
    assert server is not None  # block=False returns the server
    if tls is not None:
        _handshake_per_connection(server, tls.handshake_timeout_s)
    gate = AssociationGate(
        settings.association_deadline_s, settings.max_pending_per_source, settings.max_pending
    )

    native = (
        _native_acceptor(settings, ae, extra, incoming_dir, ingest, tracker)
        if tls is None
        else None
    )
    server.airouter_native = native  # type: ignore[attr-defined]

    def established(address: str) -> int:
        held = sum(1 for a in ae.active_associations if a.requestor.address == address)
        return held + (native.count(address) if native is not None else 0)

    def serve_natively(sock: socket.socket, address: tuple[str, int], request: bytes) -> bool:
        assert native is not None
        primitive = native.takes(request)
        if primitive is None:
            return False
        native.serve(sock, address, primitive, others=len(ae.active_associations))
        return True

    guard_connections(
        server,
        gate,
        settings.pdu_deadline_s,
        settings.maximum_pdu_size or UNLIMITED_PDU_CAP,
        settings.max_associations_per_source,
        established,
        serve_natively if native is not None else None,
    )
    if native is not None:
        _close_native_on_shutdown(server, native)
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
        "DIMSE%s listening on %s:%s as %s",
        " (TLS)" if tls is not None else "",
        settings.dimse_host,
        server.server_address[1],
        settings.ae_title,
    )
    return server
