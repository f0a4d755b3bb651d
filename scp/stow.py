"""DICOMweb STOW-RS (PS3.18 10.5): store instances posted as multipart/related.

Each part goes through the same ingest as a C-STORE: durable and indexed before the response.
A request is one unit for completion: its studies are busy while it runs and may complete as
soon as it ends. The response is the Store Instances Response Module (PS3.18 Table 10.5.3-1)
in DICOM JSON: Referenced SOP Sequence for what was stored, Failed SOP Sequence with a
Failure Reason for what was not.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


@dataclass
class Part:
    """One body part of a STOW-RS request, streamed to a file of its own."""

    headers: dict[str, str]
    path: Path
    complete: bool = True  # False: the body ended before the part's closing delimiter


class PartWriter:
    """Splits a multipart body (RFC 2046) as it streams in, each part into its own file in
    ``directory`` (on the spool's filesystem: storing a part is a rename): memory holds one
    chunk and a delimiter's length, whatever the size of the request.

    Feed it the chunks with :meth:`feed` (:class:`StowError` 413 past ``limit`` bytes, 400 for
    a part whose headers never end), then :meth:`finish`; :meth:`discard` removes every part
    file the ingest did not move into the spool.
    """

    _MAX_HEADERS = 16 << 10

    def __init__(self, boundary: str, directory: Path, limit: int) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._directory = directory
        self._limit = limit
        self._buffer = bytearray(b"\r\n")  # the first delimiter may open the body
        self._state = "preamble"
        self._file: IO[bytes] | None = None
        self._headers: dict[str, str] = {}
        self.size = 0
        self.parts: list[Part] = []

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        self.size += len(chunk)
        if self.size > self._limit:
            raise StowError(413, f"request body larger than {self._limit >> 20} MB")
        self._buffer += chunk
        while self._step():
            pass

    def finish(self) -> list[Part]:
        """The parts, once the body has ended; a part cut off by the end of the body is
        returned as incomplete (the ingest refuses it; the parts before it stand)."""
        if self._state == "body":
            assert self._file is not None
            self._file.write(self._buffer)
            self._buffer.clear()
            self._close_part(complete=False)
        if not self.parts:
            raise StowError(400, "no multipart body parts found for the boundary")
        return self.parts

    def discard(self) -> None:
        """Remove the part files still in the incoming folder (those not stored)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    def _step(self) -> bool:
        """Advance through the buffer; False when it needs more of the body."""
        buffer, delimiter = self._buffer, self._delimiter
        if self._state in ("preamble", "body"):
            at = buffer.find(delimiter)
            keep = len(delimiter) - 1  # a delimiter may straddle this chunk and the next
            if at < 0:
                if self._state == "body" and len(buffer) > keep:
                    assert self._file is not None
                    self._file.write(buffer[: len(buffer) - keep])
                del buffer[: max(0, len(buffer) - keep)]
                return False
            if self._state == "body":
                assert self._file is not None
                self._file.write(buffer[:at])
                self._close_part(complete=True)
            del buffer[: at + len(delimiter)]
            self._state = "delimiter"
            return True
        if self._state == "delimiter":  # "--" closes the body; else padding, CRLF, headers
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = "epilogue"
                return True
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > self._MAX_HEADERS:
                    raise StowError(400, "a multipart delimiter line does not end")
                return False
            del buffer[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buffer[:2] == b"\r\n":  # a part without headers
                head, rest = b"", 2
            else:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > self._MAX_HEADERS:
                        raise StowError(400, "a body part's headers do not end")
                    return False
                head, rest = bytes(buffer[:end]), end + 4
            del buffer[:rest]
            self._open_part(head)
            self._state = "body"
            return True
        buffer.clear()  # the epilogue is ignored
        return False

    def _open_part(self, head: bytes) -> None:
        self._headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                self._headers[name.strip().lower()] = value.strip()
        self._directory.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in _close_part)
            dir=self._directory, prefix="stow-", suffix=".dcm", delete=False
        )
        self._file = handle
        self.parts.append(Part(self._headers, Path(handle.name)))

    def _close_part(self, complete: bool) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        self.parts[-1].complete = complete


def _ref(sop_class: str | None, sop_uid: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    item["00081150"] = {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"}
    item["00081155"] = {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}
    return item


def store_parts(
    ingest: Ingest,
    tracker: AssociationTracker,
    parts: list[Part],
    study_uid: str | None,
    base_url: str,
    source_address: str | None,
) -> StoreResponse:
    """Store each part; the request counts as one sender until it returns."""
    response = StoreResponse()
    request_id = -next(_request_ids)  # negative: never an association's id()
    try:
        for part in parts:
            _store_one(
                ingest,
                tracker,
                request_id,
                part,
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
    part: Part,
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

    if not part.complete:
        fail(FailureReason.CANNOT_UNDERSTAND, "the request ended inside this part")
        return
    part_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if part_type != "application/dicom":
        fail(FailureReason.CANNOT_UNDERSTAND, f"part is {part_type}, not application/dicom")
        return
    try:
        ingest.check_limits(part.path)
    except TooLarge as exc:
        fail(FailureReason.OUT_OF_RESOURCES, str(exc))
        return
    except Exception as exc:
        fail(FailureReason.CANNOT_UNDERSTAND, f"not a DICOM file with meta information: {exc}")
        return
    try:
        ds = dcmread(part.path, stop_before_pixels=True)
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
        path=part.path,
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
