"""The DIMSE side of the node: a pynetdicom AE accepting C-ECHO and C-STORE (PS3.4 B)."""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from airouter.settings import Settings
from scp.commitment import STORAGE_COMMITMENT_PUSH, handle_event_report
from scp.ingest import Ingest, Received
from scp.status import StoreStatus

log = logging.getLogger(__name__)


class AssociationTracker:
    """Which studies each open association has touched; a study is busy while one is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}

    def touch(self, assoc_id: int, study_uid: str) -> None:
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(study_uid)

    def end(self, assoc_id: int) -> None:
        with self._lock:
            self._open.pop(assoc_id, None)

    def busy_studies(self) -> set[str]:
        with self._lock:
            return set().union(*self._open.values()) if self._open else set()


def handle_store(event: Any, ingest: Ingest, tracker: AssociationTracker) -> Dataset:
    """EVT_C_STORE: acknowledge only once the instance is durable and indexed.

    pynetdicom has already written the data set as received to a temporary file (chunked
    receive); only the header is parsed here, and the file is renamed into the spool.
    """
    assoc = event.assoc
    try:
        path = Path(event.dataset_path)
        ds = dcmread(path, stop_before_pixels=True)
        received = Received(
            path=path,
            transfer_syntax=str(event.context.transfer_syntax),
            command_sop_instance_uid=str(event.request.AffectedSOPInstanceUID or "") or None,
            command_sop_class_uid=str(event.request.AffectedSOPClassUID or "") or None,
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            source_address=assoc.requestor.address,
        )
    except Exception as exc:
        log.warning("assoc %s: cannot decode data set: %s", assoc.name, exc)
        return _status(StoreStatus.CANNOT_UNDERSTAND, f"cannot decode data set: {exc}")
    outcome = ingest.store_instance(ds, received)
    if outcome.status == StoreStatus.SUCCESS and outcome.study_uid:
        tracker.touch(id(assoc), outcome.study_uid)
    elif outcome.status != StoreStatus.SUCCESS:
        log.warning(
            "assoc %s: C-STORE of %s refused (0x%04X): %s",
            assoc.name,
            received.command_sop_instance_uid,
            outcome.status,
            outcome.reason,
        )
        ingest.store.record(
            "store_refused",
            {
                "sop_instance_uid": received.command_sop_instance_uid,
                "status": int(outcome.status),
                "reason": outcome.reason,
                "calling_ae": received.calling_ae,
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
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: the association's studies may complete."""
    tracker.end(id(event.assoc))


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
    tempfile.tempdir = str(incoming_dir)
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.STORE_RECV_CHUNKED_DATASET = True


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.require_calling_aet = list(settings.allowed_calling_ae_titles)
    ae.require_called_aet = settings.check_called_ae_title
    ae.add_supported_context(Verification)
    # Storage commitment reports come from the destinations we asked (they act as the SCP of
    # the SOP class on an association they start: role selection).
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def start_dimse(
    settings: Settings, ingest: Ingest, tracker: AssociationTracker
) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server so the caller can shut it down."""
    configure_pynetdicom(settings.data_dir / "incoming")
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ingest, tracker]),
        (evt.EVT_N_EVENT_REPORT, handle_event_report, [ingest.store]),
        (evt.EVT_RELEASED, handle_end, [tracker]),
        (evt.EVT_ABORTED, handle_end, [tracker]),
        (evt.EVT_CONN_CLOSE, handle_end, [tracker]),
    ]
    server = ae.start_server(
        (settings.dimse_host, settings.dimse_port), block=False, evt_handlers=handlers
    )
    assert server is not None  # block=False returns the server
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
