"""Our side of query/retrieve on another node (a PACS): C-FIND (study root) for a patient's
earlier studies and their series, and C-GET of one series into a folder (PS3.4 C.4.3: the
PACS sends the instances back on our association, so it needs no route to us).

Matching is on Patient ID, and on Issuer of Patient ID when the current study has one; never
on the name. Logs name AE titles and counts, never a patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from airouter.core.spool import write_durable

log = logging.getLogger(__name__)


class RetrieveError(Exception):
    """The PACS could not be queried or did not send what was asked; the message says why."""


@dataclass(frozen=True)
class Peer:
    """The PACS to ask: its AE title, host and port, and our AE title."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout_s: float = 60.0


def _ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    return ae


def find(peer: Peer, level: str, keys: dict[str, Any]) -> list[Dataset]:
    """The PACS's answers to a study root C-FIND at ``level`` with ``keys`` (empty values are
    return keys)."""
    ae = _ae(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise RetrieveError(f"C-FIND: no association with {peer.ae_title} at {peer.host}")
    found = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise RetrieveError(f"C-FIND to {peer.ae_title}: no answer")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.append(identifier)
            elif code != 0x0000:
                raise RetrieveError(f"C-FIND to {peer.ae_title}: status 0x{code:04X}")
    finally:
        assoc.release()
    log.info("C-FIND %s at %s: %d answers", level, peer.ae_title, len(found))
    return found


def get_series(peer: Peer, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
    """C-GET one series into ``folder`` (``<sop>.dcm``, durable); the files received."""
    ae = _ae(peer)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles: list[Any] = []
    # the storage classes a CT, MR or PET series comes in (a context each, within the 128)
    for storage in _storage_classes():
        ae.add_requested_context(storage)
        roles.append(build_role(storage, scp_role=True))
    received: list[Path] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        sop = str(ds.SOPInstanceUID)
        if not sop.replace(".", "").isdigit() or len(sop) > 64:
            return 0xC000  # not a UID: never a path
        path = folder / f"{sop}.dcm"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_durable(path, buffer.getvalue())
        received.append(path)
        return 0x0000

    folder.mkdir(parents=True, exist_ok=True)
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise RetrieveError(f"C-GET: no association with {peer.ae_title} at {peer.host}")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    last = None
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status:
                last = int(status.Status)
    finally:
        assoc.release()
    if last not in (0x0000, 0xB000) or not received:
        code = f"0x{last:04X}" if last is not None else "none"
        raise RetrieveError(f"C-GET from {peer.ae_title}: status {code}, {len(received)} received")
    log.info("C-GET from %s: %d instances", peer.ae_title, len(received))
    return received


def _storage_classes() -> Iterable[str]:
    return [
        uid.CTImageStorage,
        uid.EnhancedCTImageStorage,
        uid.MRImageStorage,
        uid.EnhancedMRImageStorage,
        uid.PositronEmissionTomographyImageStorage,
        uid.SecondaryCaptureImageStorage,
    ]
