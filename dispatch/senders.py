"""One sender per destination kind. Each takes a batch of (delivery id, archived file) and
answers, per delivery, whether the destination accepted it and what it said (the C-STORE
status, the STOW-RS response, Orthanc's answer, the file written): never "sent" unless the
destination confirmed it.

All of them are idempotent on the SOP Instance UID: a retry after a lost response stores the
same instance again, which PACS, Orthanc and the folder treat as the same object.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.presentation import build_context

from airouter.core.settings import (
    DicomNode,
    DicomWebNode,
    DispatchSettings,
    FolderNode,
    OrthancNode,
)
from airouter.core.spool import instance_path, write_durable
from airouter.core.vocab import StoreStatus, status_text
from dispatch.commitment import STORAGE_COMMITMENT_PUSH, Answers, request_commitment

log = logging.getLogger(__name__)

Items = Sequence[tuple[int, str]]  # (delivery id, path of the archived file)

_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]


def send(
    node: object,
    items: Items,
    settings: DispatchSettings,
    commitments: dict[int, str] | None = None,
    transaction_uid: str | None = None,
) -> Answers:
    """Send a batch; ``commitments`` receives delivery id -> storage commitment transaction
    UID (``transaction_uid``, recorded by the caller beforehand: the report can come back
    before this returns) for the deliveries whose commitment was requested."""
    if isinstance(node, DicomNode):
        return send_dicom(node, items, settings, commitments, transaction_uid)
    if isinstance(node, DicomWebNode):
        return send_dicomweb(node, items)
    if isinstance(node, OrthancNode):
        return send_orthanc(node, items)
    if isinstance(node, FolderNode):
        return send_folder(node, items)
    raise TypeError(f"unknown destination kind: {type(node).__name__}")


def _read(path: str, **kwargs: Any) -> Dataset:
    """An archived file, with SOP Class / Instance UIDs the data set lacked taken from its
    file meta (which holds the C-STORE request's: the ingest records when it relied on it)."""
    ds = dcmread(path, **kwargs)
    meta = getattr(ds, "file_meta", None)
    for keyword, source in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if not str(ds.get(keyword, "") or "").strip() and meta is not None and source in meta:
            setattr(ds, keyword, meta[source].value)
    return ds


def tls_context(node: DicomNode) -> ssl.SSLContext:
    """The client TLS context of a DICOM destination (its CA, our certificate)."""
    assert node.tls is not None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(node.tls.ca_file) if node.tls.ca_file else None
    )
    context.check_hostname = node.tls.verify_hostname
    if node.tls.cert_file:
        context.load_cert_chain(
            str(node.tls.cert_file), str(node.tls.key_file) if node.tls.key_file else None
        )
    return context


def send_dicom(
    node: DicomNode,
    items: Items,
    settings: DispatchSettings,
    commitments: dict[int, str] | None = None,
    transaction_uid: str | None = None,
) -> Answers:
    """C-STORE on one association, negotiating each SOP class in the transfer syntaxes of the
    files (as archived or received: nothing is transcoded) plus the uncompressed ones; then,
    for a destination with ``storage_commitment``, an N-ACTION asking it to commit to the
    instances it stored (its answer arrives later as an N-EVENT-REPORT)."""
    datasets: list[tuple[int, Dataset]] = [(i, _read(path)) for i, path in items]
    syntaxes: dict[str, list[str]] = {}
    for _, ds in datasets:
        ts = str(ds.file_meta.TransferSyntaxUID)
        listed = syntaxes.setdefault(str(ds.SOPClassUID), [])
        for uid in (ts, *_UNCOMPRESSED):
            if uid not in listed:
                listed.append(uid)
    ae = AE(ae_title=settings.calling_ae_title or "AIROUTER")
    ae.acse_timeout = settings.timeouts.acse_timeout_s
    ae.dimse_timeout = settings.timeouts.dimse_timeout_s
    ae.network_timeout = settings.timeouts.network_timeout_s
    contexts = [build_context(c, ts) for c, ts in sorted(syntaxes.items())][:127]
    if node.storage_commitment:
        contexts.append(build_context(STORAGE_COMMITMENT_PUSH))
    where = f"{node.ae_title}@{node.host}:{node.port}" + (" (TLS)" if node.tls else "")
    try:
        tls_args = (tls_context(node), node.host) if node.tls else None
    except (OSError, ssl.SSLError) as exc:
        return [(i, False, f"TLS set-up for {where} failed: {exc}") for i, _ in datasets]
    assoc = ae.associate(
        node.host, node.port, contexts=contexts, ae_title=node.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "failed"
        return [(i, False, f"association with {where} {reason}") for i, _ in datasets]
    answers: Answers = []
    try:
        for delivery_id, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context for this object
                answers.append((delivery_id, False, f"not sent: {exc}"))
                continue
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                answers.append((delivery_id, False, "no C-STORE response"))
            elif code in StoreStatus.stored():
                answers.append((delivery_id, True, f"C-STORE status {status_text(code)}"))
            else:
                comment = status.get("ErrorComment", "")
                answers.append(
                    (delivery_id, False, f"C-STORE status {status_text(code)} {comment}")
                )
        if node.storage_commitment:
            stored = {i for i, ok, _ in answers if ok}
            refs = [(i, ds) for i, ds in datasets if i in stored]
            if refs:
                transaction = transaction_uid or generate_uid()
                answers = request_commitment(assoc, refs, answers, commitments, transaction)
    finally:
        assoc.release()
    return answers


def send_dicomweb(node: DicomWebNode, items: Items) -> Answers:
    """STOW-RS, one instance per request so each answer is that instance's own."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if node.token:
        session.headers["Authorization"] = f"Bearer {node.token}"
    elif node.username is not None:
        session.auth = (node.username, node.password or "")
    if node.ca_file:
        session.verify = str(node.ca_file)
    client = DICOMwebClient(node.url, session=session, timeout=node.timeout_s)
    answers: Answers = []
    for delivery_id, path in items:
        ds = _read(path)
        try:
            response = client.store_instances([ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            body = exc.response.text[:200] if exc.response is not None else ""
            answers.append((delivery_id, False, f"STOW-RS HTTP {code}: {body}".strip()))
            continue
        except (requests.RequestException, OSError) as exc:
            answers.append((delivery_id, False, f"STOW-RS to {node.url} failed: {exc}"))
            continue
        failed = response.get("FailedSOPSequence", [])
        stored = response.get("ReferencedSOPSequence", [])
        if failed:
            reason = failed[0].get("FailureReason", "?")
            answers.append((delivery_id, False, f"STOW-RS failed, Failure Reason {reason}"))
        elif any(item.get("ReferencedSOPInstanceUID") == ds.SOPInstanceUID for item in stored):
            answers.append((delivery_id, True, "STOW-RS stored"))
        else:
            answers.append((delivery_id, False, "STOW-RS response does not list the instance"))
    return answers


def send_orthanc(node: OrthancNode, items: Items) -> Answers:
    """Orthanc's REST API (POST /instances through orthanc-api-client)."""
    from orthanc_api_client import OrthancApiClient

    client = OrthancApiClient(node.url, user=node.username, pwd=node.password)
    answers: Answers = []
    for delivery_id, path in items:
        try:
            ids = client.upload(Path(path).read_bytes())
        except Exception as exc:  # requests' errors, OSError and orthanc-api-client's own
            answers.append((delivery_id, False, f"Orthanc REST {node.url}: {exc}"[:300]))
            continue
        if ids:
            answers.append((delivery_id, True, f"Orthanc REST: instance {ids[0]}"))
        else:
            answers.append((delivery_id, False, "Orthanc REST: no instance id in the answer"))
    return answers


def send_folder(node: FolderNode, items: Items) -> Answers:
    """Write each file durably as ``<path>/<study>/<series>/<sop>.dcm``."""
    answers: Answers = []
    for delivery_id, path in items:
        try:
            ds = _read(path, stop_before_pixels=True)
            target = instance_path(
                node.path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            write_durable(target, Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            answers.append((delivery_id, False, f"folder {node.path}: {exc}"))
            continue
        answers.append((delivery_id, True, f"written to {target}"))
    return answers
