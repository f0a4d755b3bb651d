"""DICOMweb STOW-RS (PS3.18 10.5): store instances posted as multipart/related.

Each part goes through the same ingest as a C-STORE: durable and indexed before the response.
A request is one unit for completion: its studies are busy while it runs and may complete as
soon as it ends. The response is the Store Instances Response Module (PS3.18 Table 10.5.3-1)
in DICOM JSON: Referenced SOP Sequence for what was stored, Failed SOP Sequence with a
Failure Reason for what was not.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from airouter.core.tags import read_or_none
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import FailureReason, Source, StoreStatus
from scp.ingest import Ingest, Received
from scp.limits import TooLarge

log = logging.getLogger(__name__)

# The Failure Reason a STOW-RS response gives for what the ingest answered.
_STATUS_TO_REASON = {
    StoreStatus.OUT_OF_RESOURCES: FailureReason.OUT_OF_RESOURCES,
    StoreStatus.DATASET_MISMATCH: FailureReason.DATASET_MISMATCH,
    StoreStatus.CANNOT_UNDERSTAND: FailureReason.CANNOT_UNDERSTAND,
    StoreStatus.PROCESSING_FAILURE: FailureReason.PROCESSING_FAILURE,
}
_request_ids = itertools.count(1)


class StowError(Exception):
    """The request itself is unusable (HTTP 400 / 415); no part was stored."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class StoreResponse:
    """The Store Instances Response of one STOW-RS request, built part by part."""

    referenced: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.referenced else 409

    def dicom_json(self, retrieve_url: str | None) -> dict[str, Any]:
        """The response in DICOM JSON (PS3.18 Table 10.5.3-1)."""
        body: dict[str, Any] = {}
        if retrieve_url:
            body["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": self.failed}
        if self.referenced:
            body["00081199"] = {"vr": "SQ", "Value": self.referenced}
        return body


def boundary_of(content_type: str) -> str:
    """The multipart boundary, after checking the media type (415 when it is not DICOM)."""
    if not content_type.lower().startswith("multipart/related"):
        raise StowError(415, 'Content-Type must be multipart/related; type="application/dicom"')
    type_param = re.search(r'type="?([^";]+)"?', content_type, re.I)
    if type_param and type_param.group(1).strip().lower() != "application/dicom":
        raise StowError(415, f"unsupported multipart type {type_param.group(1)!r}")
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    if not match:
        raise StowError(400, "multipart/related without a boundary")
    return match.group(1).strip()


def split_parts(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body as (headers, content) (RFC 2046)."""
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise StowError(400, "no multipart body parts found for the boundary")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the close delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise StowError(400, "a body part has no header/content separator")
        content = content[:-2] if content.endswith(b"\r\n") else content
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def _ref(sop_class: str | None, sop_uid: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    item["00081150"] = {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"}
    item["00081155"] = {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}
    return item


def store_parts(
    ingest: Ingest,
    tracker: AssociationTracker,
    parts: list[tuple[dict[str, str], bytes]],
    study_uid: str | None,
    base_url: str,
    source_address: str | None,
) -> StoreResponse:
    """Store each part; the request counts as one sender until it returns."""
    response = StoreResponse()
    request_id = -next(_request_ids)  # negative: never an association's id()
    try:
        for headers, content in parts:
            _store_one(
                ingest,
                tracker,
                request_id,
                headers,
                content,
                study_uid,
                base_url,
                source_address,
                response,
            )
    finally:
        tracker.end(request_id)
    return response


def _store_one(
    ingest: Ingest,
    tracker: AssociationTracker,
    request_id: int,
    headers: dict[str, str],
    content: bytes,
    study_uid: str | None,
    base_url: str,
    source_address: str | None,
    response: StoreResponse,
) -> None:
    def fail(reason: int, text: str, sop_class: str | None = None, sop: str | None = None) -> None:
        item = _ref(sop_class, sop)
        item["00081197"] = {"vr": "US", "Value": [int(reason)]}
        item["00000902"] = {"vr": "LO", "Value": [text[:64]]}  # Error Comment, for people
        response.failed.append(item)
        log.warning("STOW part refused (0x%04X): %s", reason, text)

    part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if part_type != "application/dicom":
        fail(FailureReason.CANNOT_UNDERSTAND, f"part is {part_type}, not application/dicom")
        return
    try:
        ingest.check_limits(content)
    except TooLarge as exc:
        fail(FailureReason.OUT_OF_RESOURCES, str(exc))
        return
    except Exception as exc:
        fail(FailureReason.CANNOT_UNDERSTAND, f"not a DICOM file with meta information: {exc}")
        return
    try:
        ds = dcmread(io.BytesIO(content), stop_before_pixels=True)
        meta = ds.file_meta
        transfer_syntax = str(meta.TransferSyntaxUID)
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as exc:
        fail(FailureReason.CANNOT_UNDERSTAND, f"not a DICOM file with meta information: {exc}")
        return
    except Exception as exc:
        fail(FailureReason.CANNOT_UNDERSTAND, f"cannot parse data set: {exc}")
        return
    sop_class = str(read_or_none(ds, "SOPClassUID") or meta.get("MediaStorageSOPClassUID", ""))
    sop_uid = str(read_or_none(ds, "SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID", ""))
    if study_uid is not None and str(read_or_none(ds, "StudyInstanceUID") or "") != study_uid:
        fail(
            FailureReason.CANNOT_UNDERSTAND,
            "StudyInstanceUID differs from the request URL",
            sop_class,
            sop_uid,
        )
        return
    received = Received(
        transfer_syntax=transfer_syntax,
        data=content,
        command_sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID", "")) or None,
        command_sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")) or None,
        calling_ae=None,
        source_address=source_address,
        source=Source.STOW,
    )
    outcome = ingest.store_instance(ds, received)
    if outcome.status != StoreStatus.SUCCESS:
        fail(
            _STATUS_TO_REASON.get(outcome.status, FailureReason.PROCESSING_FAILURE),
            outcome.reason,
            sop_class,
            sop_uid,
        )
        return
    assert outcome.study_uid is not None
    tracker.touch(request_id, outcome.study_uid)
    item = _ref(sop_class, outcome.sop_instance_uid)
    series = str(read_or_none(ds, "SeriesInstanceUID") or "")
    item["00081190"] = {
        "vr": "UR",
        "Value": [
            f"{base_url}/studies/{outcome.study_uid}/series/{series}"
            f"/instances/{outcome.sop_instance_uid}"
        ],
    }
    response.referenced.append(item)
