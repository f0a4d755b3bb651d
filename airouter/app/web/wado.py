"""WADO-RS (PS3.18 10.4) of the node's archive: instances, metadata, frames, bulk data and
rendered images, each with Accept-header negotiation.

- ``/studies/{s}``, ``.../series/{se}``, ``.../instances/{i}``: ``multipart/related;
  type="application/dicom"``, in the stored transfer syntax (``transfer-syntax=*``, or none
  given, or the stored one) or transcoded to Explicit VR Little Endian when that is asked for.
- ``.../metadata`` at each level: DICOM JSON, with a ``BulkDataURI`` for pixel data and for
  any other binary value over 1 KB, and the stored transfer syntax as
  ``AvailableTransferSyntaxUID``.
- ``.../instances/{i}/frames/{list}``: ``multipart/related; type="application/octet-stream"``
  (decoded, little endian; the default) or, with ``transfer-syntax=*`` or the stored syntax's
  own media type (``image/jpeg``, ``image/jls``, ``image/jp2`` ...), as stored.
- ``.../instances/{i}/bulk/{tag}``: one top-level value as ``application/octet-stream``.
- ``.../instances/{i}/rendered`` and ``.../frames/{n}/rendered``: JPEG (the default) or PNG,
  windowed (``window=center,width``, else the instance's own window, else its range),
  scaled into ``viewport=w,h``; ``.../series/{se}/thumbnail`` and ``.../instances/{i}/thumbnail``
  the same, small (128 px unless ``viewport`` says).
- One instance (``application/dicom``) and one bulk value (``application/octet-stream``) come
  on their own when the Accept header asks for that media type rather than a multipart one.

What the Accept header asks and cannot be given is a 406 that says what can be.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select

from airouter.core.db import Instance, Store
from airouter.core.spool import is_valid_uid

DICOM_JSON = "application/dicom+json"
OCTETS = "application/octet-stream"
BULK_THRESHOLD = 1024  # binary values longer than this are given as a BulkDataURI
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PIXEL_DATA = 0x7FE00010
# The media type a frame of a compressed transfer syntax is sent as (PS3.18 Table 8.7.3-2).
_FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


# An archived instance never changes (a SOP Instance UID names one content): a browser may
# keep its rendered images (the dashboard's thumbnails are asked for at every refresh).
_IMAGE_CACHE = {"Cache-Control": "private, max-age=3600"}


def check_uids(*uids: str) -> None:
    """400 unless each value is a valid UID (they become paths and queries)."""
    for uid in uids:
        if not is_valid_uid(uid):
            raise HTTPException(400, f"not a valid UID: {uid[:70]!r}")


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header: type, parameters (lower-case names), quality."""

    media: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media: str) -> bool:
        """Whether this range covers ``media`` (``*/*``, ``image/*`` or the type itself)."""
        if self.media in ("*/*", media):
            return True
        return self.media.endswith("/*") and media.startswith(self.media[:-1])


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (no header: ``*/*``). A range
    whose quality is no number counts as q=0 (refused) rather than failing the request."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = []
    for item in _split(header, ","):
        pieces = [p.strip() for p in _split(item, ";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def public_base(request: Request) -> str:
    """The URL of the node's DICOMweb as the client reached it, for the URIs we answer
    with. From the Host header; one without a port (dicomweb-client sends its host name
    alone) on a server that listens on a non-default port gets that port."""
    url = request.base_url
    server = request.scope.get("server")
    default = 443 if url.scheme == "https" else 80
    if url.port is None and server and server[1] not in (None, default):
        url = url.replace(port=server[1])
    return str(url).rstrip("/") + "/dicomweb"


def _part_media(r: MediaRange, default: str) -> str:
    """The media type of the parts a range asks for: its ``type`` when it is multipart."""
    if r.media in ("multipart/related", "multipart/*"):
        return r.params.get("type", default).lower()
    return r.media


def _single_part(accept: list[MediaRange], media: str) -> bool:
    """Whether the best range the server can meet asks for ``media`` on its own rather than
    in a multipart body (PS3.18 8.7.3.1: single-part for one instance or one bulk value)."""
    for r in accept:
        if r.media == media:
            return True
        if r.media in ("multipart/related", "multipart/*", "*/*"):
            return False
    return False


def _not_acceptable(what: str, offered: str) -> HTTPException:
    return HTTPException(406, f"cannot answer with {what[:200]!r}; this resource offers {offered}")


def _multipart(parts: Iterator[tuple[str, bytes]], part_type: str) -> StreamingResponse:
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for content_type, data in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    media = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


# --- instances ---------------------------------------------------------------------------


def _instance_syntax(accept: list[MediaRange]) -> str:
    """The transfer syntax asked for instances: ``*`` (as stored) or a UID; 406 otherwise."""
    for r in accept:
        if MediaRange(_part_media(r, "application/dicom")).matches("application/dicom"):
            return r.params.get("transfer-syntax", "*")
    wanted = ", ".join(r.media for r in accept)
    raise _not_acceptable(wanted, 'multipart/related; type="application/dicom"')


def _as_explicit_le(path: str) -> bytes:
    """The instance at ``path`` in Explicit VR Little Endian (pixel data decoded)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        # decodes and sets Explicit VR Little Endian; the instance keeps its UID
        ds.decompress(generate_instance_uid=False)
    else:
        if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_little_endian:
            arr = ds.pixel_array
            ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    # from big endian too (its pixel data swapped above)
    pydicom.dcmwrite(
        buffer, ds, implicit_vr=False, little_endian=True,
        force_encoding=True,
    )  # fmt: skip
    return buffer.getvalue()


def _instance_parts(rows: list[tuple[str, str]], syntax: str) -> Iterator[tuple[str, bytes]]:
    for path, stored in rows:
        if syntax in ("*", stored):
            data, sent = Path(path).read_bytes(), stored
        else:
            data, sent = _as_explicit_le(path), ExplicitVRLittleEndian
        yield f'application/dicom; transfer-syntax="{sent}"', data


def _check_transcodable(rows: list[tuple[str, str]], syntax: str) -> None:
    if syntax in ("*", ExplicitVRLittleEndian) or all(s == syntax for _, s in rows):
        return
    raise _not_acceptable(
        f"transfer-syntax={syntax}",
        f"the stored transfer syntax (transfer-syntax=*) or {ExplicitVRLittleEndian}",
    )


# --- metadata ----------------------------------------------------------------------------


def _metadata(path: str, stored: str, bulk_base: str) -> dict[str, Any]:
    """DICOM JSON of one instance, large binary values as BulkDataURIs under ``bulk_base``."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = ds.to_json_dict(bulk_data_threshold=1 << 62)
    for key, element in out.items():
        inline = element.get("InlineBinary")
        if element.get("vr") in _BINARY_VRS and inline and len(inline) * 3 // 4 > BULK_THRESHOLD:
            out[key] = {"vr": element["vr"], "BulkDataURI": f"{bulk_base}/{key}"}
    if "Rows" in ds:  # an image: its pixel data is bulk data
        encapsulated = UID(stored).is_compressed
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated", 8)) <= 8 else "OW"
        out["7FE00010"] = {"vr": vr, "BulkDataURI": f"{bulk_base}/7FE00010"}
    out["00083002"] = {"vr": "UI", "Value": [stored]}
    return dict(sorted(out.items()))


# --- frames ------------------------------------------------------------------------------


def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for piece in text.split(","):
        if not re.fullmatch(r"\s*\d{1,9}\s*", piece) or int(piece) < 1:
            raise HTTPException(400, f"not a list of frame numbers (from 1): {text[:60]!r}")
        numbers.append(int(piece))
    return numbers


def _frames_mode(accept: list[MediaRange], stored: str) -> str:
    """``decoded`` or ``stored`` (frames as they are held), as the Accept header asks."""
    native = not UID(stored).is_compressed
    own = _FRAME_MEDIA.get(stored)
    for r in accept:
        media = _part_media(r, OCTETS)
        syntax = r.params.get("transfer-syntax")
        if media == "*/*":
            return "stored" if syntax == "*" else "decoded"
        if media == OCTETS:
            if syntax in (None, ExplicitVRLittleEndian, "1.2.840.10008.1.2"):
                return "decoded"
            if syntax == "*" or syntax == stored:
                return "stored"
            continue
        if own is not None and MediaRange(media).matches(own) and syntax in (None, "*", stored):
            return "stored"
        if native and media == "image/*":
            return "decoded"
    offered = f'multipart/related; type="{OCTETS}"' + (
        f' or type="{own}" (as stored, {stored})' if own else ""
    )
    raise _not_acceptable(", ".join(r.media for r in accept), offered)


def _native_frames(ds: Dataset, numbers: list[int]) -> Iterator[bytes]:
    """Frames of native (uncompressed) pixel data, little endian, each whole bytes."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    pixels_per_frame = rows * cols * samples
    data: bytes = ds.PixelData
    if not ds.file_meta.TransferSyntaxUID.is_little_endian and bits > 8:
        arr = ds.pixel_array.reshape(-1)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if bits == 1:  # frames are packed end to end; each frame sent on its own is padded
        unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        for n in numbers:
            frame = unpacked[(n - 1) * pixels_per_frame : n * pixels_per_frame]
            yield np.packbits(frame, bitorder="little").tobytes()
        return
    size = pixels_per_frame * bits // 8
    for n in numbers:
        yield data[(n - 1) * size : n * size]


def _frames(path: str, numbers: list[int], mode: str) -> list[tuple[str, bytes]]:
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data (no frames)")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise HTTPException(404, f"frame {beyond[0]} beyond the instance's {count}")
    stored = str(ds.file_meta.TransferSyntaxUID)
    if not UID(stored).is_compressed:
        octets = f'{OCTETS}; transfer-syntax="{ExplicitVRLittleEndian}"'
        return [(octets, f) for f in _native_frames(ds, numbers)]
    if mode == "stored":
        media = _FRAME_MEDIA.get(stored, OCTETS)
        held = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [(f'{media}; transfer-syntax="{stored}"', held[n - 1]) for n in numbers]
    try:
        arr = ds.pixel_array
    except Exception as exc:  # no decoder for this syntax: say so, as stored is offered
        raise _not_acceptable(
            f"{OCTETS} (decoded from {stored}: {exc})"[:200], "transfer-syntax=* (as stored)"
        ) from exc
    arr = arr.reshape((count, -1)) if count > 1 else arr.reshape((1, -1))
    octets = f'{OCTETS}; transfer-syntax="{ExplicitVRLittleEndian}"'
    little = arr.astype(arr.dtype.newbyteorder("<"))
    return [(octets, little[n - 1].tobytes()) for n in numbers]


# --- rendered ----------------------------------------------------------------------------


def _rendered_media(accept: list[MediaRange]) -> str:
    for r in accept:
        for media in ("image/jpeg", "image/png"):
            if r.matches(media):
                return media
    raise _not_acceptable(", ".join(r.media for r in accept), "image/jpeg or image/png")


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        center, width = (float(v) for v in text.split(",")[:2])
    except ValueError:
        raise HTTPException(400, f"window is center,width[,function]: {text[:40]!r}") from None
    if width <= 0:
        raise HTTPException(400, f"window width must be positive: {text[:40]!r}")
    return center, width


def _viewport(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,4})\s*,\s*(\d{1,4})\s*", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise HTTPException(400, f"viewport is width,height (1-9999): {text[:40]!r}")
    return int(match[1]), int(match[2])


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def render(
    ds: Dataset,
    frame: int,
    media: str,
    window: tuple[float, float] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int = 90,
) -> bytes:
    """One frame of ``ds`` as an 8-bit JPEG or PNG: rescaled, windowed (the asked window,
    else the instance's, else its range), MONOCHROME1 inverted, fitted into ``viewport``."""
    from PIL import Image

    count = int(ds.get("NumberOfFrames", 1) or 1)
    arr = ds.pixel_array
    if count > 1:
        arr = arr[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour: as it is (already RGB when decoded)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    else:
        values = arr.astype(np.float64)
        if int(ds.get("BitsAllocated", 16)) == 1:
            values = values * 255.0
        else:
            values = values * float(ds.get("RescaleSlope", 1) or 1)
            values = values + float(ds.get("RescaleIntercept", 0) or 0)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        if window is None:
            low, high = float(values.min()), float(values.max())
        else:
            low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
        scaled = (values - low) / max(high - low, 1e-9) * 255.0
        gray = np.clip(scaled, 0, 255).astype(np.uint8)
        if photometric == "MONOCHROME1":
            gray = (255 - gray).astype(np.uint8)
        image = Image.fromarray(gray, "L")
    if viewport is not None:
        image.thumbnail(viewport)
    buffer = io.BytesIO()
    if media == "image/png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --- the routes --------------------------------------------------------------------------


def wado_router(store: Store) -> APIRouter:
    """WADO-RS of the archive: instances, metadata, frames, bulk data, rendered."""
    app = APIRouter(prefix="/dicomweb")

    def rows(**where: str) -> list[tuple[str, str, str, str, str]]:
        """(path, transfer syntax, study, series, SOP instance) of what matches; 404 if none."""
        with store.session() as s:
            q = select(
                Instance.path,
                Instance.transfer_syntax,
                Instance.study_uid,
                Instance.series_uid,
                Instance.sop_instance_uid,
            )
            for column, value in where.items():
                q = q.where(getattr(Instance, column) == value)
            found = s.execute(q.order_by(Instance.series_uid, Instance.instance_number)).all()
        if not found:
            raise HTTPException(404, "not found")
        return [tuple(r) for r in found]  # type: ignore[misc]

    def retrieve(request: Request, **where: str) -> StreamingResponse:
        syntax = _instance_syntax(parse_accept(request.headers.get("accept")))
        found = [(path, ts) for path, ts, *_ in rows(**where)]
        _check_transcodable(found, syntax)
        return _multipart(_instance_parts(found, syntax), "application/dicom")

    def metadata(request: Request, **where: str) -> JSONResponse:
        accept = parse_accept(request.headers.get("accept"))
        if not any(r.matches(DICOM_JSON) or r.matches("application/json") for r in accept):
            wanted = ", ".join(r.media for r in accept)
            raise _not_acceptable(wanted, f"{DICOM_JSON} (no XML metadata)")
        base = public_base(request)
        answer = []
        for path, ts, study, series, sop in rows(**where):
            bulk = f"{base}/studies/{study}/series/{series}/instances/{sop}/bulk"
            answer.append(_metadata(path, ts, bulk))
        return JSONResponse(answer, media_type=DICOM_JSON)

    @app.get("/studies/{study}")
    def retrieve_study(study: str, request: Request) -> StreamingResponse:
        """The study's instances."""
        check_uids(study)
        return retrieve(request, study_uid=study)

    @app.get("/studies/{study}/series/{series}")
    def retrieve_series(study: str, series: str, request: Request) -> StreamingResponse:
        """The series' instances."""
        check_uids(study, series)
        return retrieve(request, study_uid=study, series_uid=series)

    @app.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(study: str, series: str, sop: str, request: Request) -> Response:
        """One instance: multipart, or on its own when ``application/dicom`` is asked."""
        check_uids(study, series, sop)
        accept = parse_accept(request.headers.get("accept"))
        if not _single_part(accept, "application/dicom"):
            return retrieve(request, study_uid=study, series_uid=series, sop_instance_uid=sop)
        syntax = _instance_syntax(accept)
        path, stored, *_ = rows(study_uid=study, series_uid=series, sop_instance_uid=sop)[0]
        _check_transcodable([(path, stored)], syntax)
        ((media, data),) = _instance_parts([(path, stored)], syntax)
        return Response(data, media_type=media)

    @app.get("/studies/{study}/metadata")
    def study_metadata(study: str, request: Request) -> JSONResponse:
        """DICOM JSON of the study's instances."""
        check_uids(study)
        return metadata(request, study_uid=study)

    @app.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(study: str, series: str, request: Request) -> JSONResponse:
        """DICOM JSON of the series' instances."""
        check_uids(study, series)
        return metadata(request, study_uid=study, series_uid=series)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_metadata(study: str, series: str, sop: str, request: Request) -> JSONResponse:
        """DICOM JSON of one instance."""
        check_uids(study, series, sop)
        return metadata(request, study_uid=study, series_uid=series, sop_instance_uid=sop)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
    def retrieve_frames(
        study: str, series: str, sop: str, frames: str, request: Request
    ) -> StreamingResponse:
        """Frames of one instance, decoded or as stored."""
        check_uids(study, series, sop)
        numbers = _frame_numbers(frames)
        path, stored, *_ = rows(study_uid=study, series_uid=series, sop_instance_uid=sop)[0]
        mode = _frames_mode(parse_accept(request.headers.get("accept")), stored)
        parts = _frames(path, numbers, mode)
        part_type = parts[0][0].split(";")[0] if parts else OCTETS
        return _multipart(iter(parts), part_type)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/bulk/{tag}")
    def retrieve_bulk(study: str, series: str, sop: str, tag: str, request: Request) -> Response:
        """One top-level value of the instance (a BulkDataURI of its metadata)."""
        check_uids(study, series, sop)
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
            raise HTTPException(400, f"not a tag (8 hex digits): {tag[:20]!r}")
        accept = parse_accept(request.headers.get("accept"))
        if not any(MediaRange(_part_media(r, OCTETS)).matches(OCTETS) for r in accept):
            raise _not_acceptable(", ".join(r.media for r in accept), OCTETS)
        path, stored, *_ = rows(study_uid=study, series_uid=series, sop_instance_uid=sop)[0]
        ds = pydicom.dcmread(path)
        element = ds.get(int(tag, 16))
        if element is None or element.VR not in _BINARY_VRS or element.is_empty:
            raise HTTPException(404, f"this instance has no bulk data at {tag.upper()}")
        data = element.value
        if not UID(stored).is_little_endian and element.VR in ("OW", "OF", "OD", "OL"):
            width = {"OW": 2, "OF": 4, "OD": 8, "OL": 4}[element.VR]
            data = np.frombuffer(data, f">u{width}").astype(f"<u{width}").tobytes()
        syntax = stored if int(tag, 16) == _PIXEL_DATA else ExplicitVRLittleEndian
        part = f'{OCTETS}; transfer-syntax="{syntax}"'
        if _single_part(accept, OCTETS):
            return Response(data, media_type=part)
        return _multipart(iter([(part, data)]), OCTETS)

    def rendered(request: Request, where: dict[str, str], frame: int) -> Response:
        media = _rendered_media(parse_accept(request.headers.get("accept")))
        window = _window(request.query_params.get("window"))
        viewport = _viewport(request.query_params.get("viewport"))
        quality_text = request.query_params.get("quality", "90")
        if not quality_text.isdigit() or not 1 <= int(quality_text) <= 100:
            raise HTTPException(400, f"quality is 1-100: {quality_text[:20]!r}")
        path, *_ = rows(**where)[0]
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise HTTPException(404, "this instance has no pixel data to render")
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if frame > count:
            raise HTTPException(404, f"frame {frame} beyond the instance's {count}")
        try:
            image = render(ds, frame, media, window, viewport, int(quality_text))
        except Exception as exc:  # pixel data no decoder reads: a clear answer
            raise HTTPException(422, f"cannot render this instance: {exc}"[:300]) from exc
        return Response(image, media_type=media, headers=_IMAGE_CACHE)

    @app.get("/studies/{study}/series/{series}/thumbnail")
    def series_thumbnail(study: str, series: str, request: Request) -> Response:
        """A small image of the series' middle instance (the dashboard's, a viewer's)."""
        check_uids(study, series)
        found = rows(study_uid=study, series_uid=series)
        _, _, _, _, sop = found[len(found) // 2]
        return thumbnail(
            request, {"study_uid": study, "series_uid": series, "sop_instance_uid": sop}
        )

    @app.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
    def instance_thumbnail(study: str, series: str, sop: str, request: Request) -> Response:
        """A small image of the instance."""
        check_uids(study, series, sop)
        return thumbnail(
            request, {"study_uid": study, "series_uid": series, "sop_instance_uid": sop}
        )

    def thumbnail(request: Request, where: dict[str, str]) -> Response:
        media = _rendered_media(parse_accept(request.headers.get("accept")))
        viewport = _viewport(request.query_params.get("viewport")) or (128, 128)
        path, *_ = rows(**where)[0]
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise HTTPException(404, "this instance has no pixel data to render")
        count = int(ds.get("NumberOfFrames", 1) or 1)
        try:
            image = render(ds, (count + 1) // 2, media, None, viewport, 80)
        except Exception as exc:  # pixel data no decoder reads: a clear answer
            raise HTTPException(422, f"cannot render this instance: {exc}"[:300]) from exc
        return Response(image, media_type=media, headers=_IMAGE_CACHE)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
    def instance_rendered(study: str, series: str, sop: str, request: Request) -> Response:
        """The instance's first frame as an image."""
        check_uids(study, series, sop)
        where = {"study_uid": study, "series_uid": series, "sop_instance_uid": sop}
        return rendered(request, where, 1)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered")
    def frame_rendered(study: str, series: str, sop: str, frame: str, request: Request) -> Response:
        """One frame as an image."""
        check_uids(study, series, sop)
        numbers = _frame_numbers(frame)
        if len(numbers) != 1:
            raise HTTPException(400, "rendered takes one frame")
        where = {"study_uid": study, "series_uid": series, "sop_instance_uid": sop}
        return rendered(request, where, numbers[0])

    return app
