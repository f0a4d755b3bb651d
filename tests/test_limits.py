"""Bounded costs: a deflate bomb by C-STORE and by STOW-RS is refused with a reason, and a
request body over the limit gets 413, each without the node's memory growing (measured on the
running node process from the kernel's peak-RSS counter)."""

from __future__ import annotations

import http.client
import json
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from airouter.core.vocab import FailureReason, StoreStatus
from scp.limits import TooLarge, check_inflation
from tests.peers import ROOT, NodeProcess, free_port, head_ct_files, start_node
from tests.test_scp import _send

pytestmark = pytest.mark.integration

BOMB_PIXELS = 2_000_000_000  # 2 GB of zeros: about 2 MB deflated


def deflate_bomb(path: Path, pixel_bytes: int = BOMB_PIXELS) -> Path:
    """A CT instance in Deflated Explicit VR Little Endian whose pixel data is ``pixel_bytes``
    of zeros, written without ever holding them (16 MB at a time)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BOMB", "CT"
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    # (7FE0,0010) OB, reserved, 4-byte length
    element = b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        CTImageStorage,
        ds.SOPInstanceUID,
    )
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(16 << 20)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        meta_fp = DicomBytesIO()
        meta_fp.is_little_endian, meta_fp.is_implicit_VR = True, False
        write_file_meta_info(meta_fp, meta, enforce_standard=True)
        out.write(meta_fp.getvalue())
        out.write(deflater.compress(header.getvalue() + element))
        left = pixel_bytes
        while left:
            step = min(left, len(zeros))
            out.write(deflater.compress(zeros[:step]))
            left -= step
        out.write(deflater.flush())
    return path


def test_the_inflated_size_is_measured_in_bounded_memory(tmp_path: Path) -> None:
    small = deflate_bomb(tmp_path / "small.dcm", 1 << 20)
    check_inflation(small, 2 << 20)  # 1 MB of pixels: passes a 2 MB limit
    with pytest.raises(TooLarge, match="inflates beyond 0 MB"):
        check_inflation(small, 1000)
    assert pydicom.dcmread(small, stop_before_pixels=True).PatientID == "BOMB"  # a real file


def _peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _plain_instance(path: Path, side: int = 1024) -> Path:
    """An ordinary CT instance of ``side`` x ``side`` 16-bit pixels (1024: about the bomb's
    size on the wire, 2 MB), in a study of its own."""
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(range(256)) * (2 * side * side // 256)
    ds.save_as(path, enforce_file_format=True)
    return path


def _stow(node: NodeProcess, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=60)
    connection.request(
        "POST",
        "/dicomweb/studies",
        body=b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n--XX--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'},
    )
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read() or b"{}")


def _framed(part: bytes) -> Iterator[bytes]:
    """One part in a multipart/related body (boundary XX), in 1 MB pieces."""
    yield b"--XX\r\nContent-Type: application/dicom\r\n\r\n"
    for at in range(0, len(part), 1 << 20):
        yield part[at : at + (1 << 20)]
    yield b"\r\n--XX--\r\n"


def _stow_chunked(node: NodeProcess, pieces: Iterable[bytes]) -> tuple[int, dict]:
    """STOW-RS with Transfer-Encoding: chunked (no Content-Length); the node may answer and
    close before the whole body is sent."""
    connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=60)
    connection.putrequest("POST", "/dicomweb/studies")
    connection.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=XX')
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    try:
        for piece in pieces:
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read() or b"{}")


def test_bombs_and_huge_bodies_are_refused_without_the_node_growing(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 8 << 20
    # Only a classic model: a network model makes the node import torch and MONAI in the
    # background at start (200 MB), which would be counted against the bombs.
    models, rules = tmp_path / "models", tmp_path / "rules"
    models.mkdir()
    rules.mkdir()
    shutil.copy(ROOT / "config" / "models" / "ct-body.yaml", models)
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        inference={"triton_url": f"127.0.0.1:{free_port()}", "models_dir": str(models)},
        router={"rules_dir": str(rules)},
        http={"max_request_mb": 100, "body_timeout_s": 2},
    )
    pid = node.process.pid
    try:
        # Warm up with ordinary instances of the bomb's wire size by each way in (the first
        # transfers cost the node some buffers once, whatever they hold): what is measured
        # next is the bombs.
        plain = _plain_instance(tmp_path / "plain.dcm")
        assert _send(node.dimse_port, plain).Status == StoreStatus.SUCCESS
        assert _stow(node, plain.read_bytes())[0] == 200
        ordinary = deflate_bomb(tmp_path / "ordinary.dcm", 1 << 20)
        assert _send(node.dimse_port, ordinary).Status == 0
        _peak_rss_reset(pid)
        before = _rss_mb(pid)

        # C-STORE: the deflated bytes arrive (2 MB), are measured, refused with a reason
        status = _send(node.dimse_port, bomb)  # its file meta says: deflated
        assert status.Status == StoreStatus.OUT_OF_RESOURCES
        assert "inflates beyond 1024 MB" in status.ErrorComment

        # STOW-RS: the same bomb as a part, refused in the Failed SOP Sequence
        code, answer = _stow(node, bomb.read_bytes())
        assert code == 409, answer
        (failed,) = answer["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [FailureReason.OUT_OF_RESOURCES]
        assert "inflates beyond" in failed["00000902"]["Value"][0]

        # a 200 MB part: 413 from its Content-Length, before the body is read
        connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=60)
        connection.putrequest("POST", "/dicomweb/studies")
        connection.putheader(
            "Content-Type", 'multipart/related; type="application/dicom"; boundary=XX'
        )
        connection.putheader("Content-Length", str(200 << 20))
        connection.endheaders()
        chunk, sent = bytes(1 << 20), 0
        try:
            while sent < 200 << 20:
                connection.send(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed without reading it all
        answer413 = connection.getresponse()
        assert answer413.status == 413
        assert json.loads(answer413.read())["status"] == 413

        # chunked bodies announce no length: streamed to disk as they come, part by part
        large = _plain_instance(tmp_path / "large.dcm", side=6144)  # 72 MB of pixels
        code, answer = _stow_chunked(node, _framed(large.read_bytes()))
        assert code == 200, answer
        code, answer = _stow_chunked(node, (bytes(1 << 20) for _ in range(200)))
        assert code == 413, answer
        assert answer["status"] == 413 and "larger than 100 MB" in answer["error"]

        # a body that stops arriving: 408 once nothing came for body_timeout_s
        stalled = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=30)
        stalled.putrequest("POST", "/dicomweb/studies")
        stalled.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=X')
        stalled.putheader("Content-Length", str(10 << 20))
        stalled.endheaders()
        stalled.send(b"--X\r\nContent-Type: application/dicom\r\n\r\n" + bytes(1000))
        t0 = time.monotonic()
        answer408 = stalled.getresponse()
        assert answer408.status == 408 and json.loads(answer408.read())["status"] == 408
        assert 1.5 < time.monotonic() - t0 < 10

        grown = _peak_rss_mb(pid) - before
        assert grown < 100, f"the node grew by {grown:.0f} MB"
        assert node.get("/api/health")["status"] == "ok"
        studies = node.get("/dicomweb/studies")
        assert len(studies) == 3  # the plain, the ordinary deflated and the large instance
        refused = node.get("/api/events?kind=store_refused")
        assert refused and "inflates beyond" in refused[0]["detail"]
        assert not [f for f in (node.data_dir / "incoming").rglob("*") if f.is_file()]
    finally:
        node.process.terminate()
        node.process.wait(timeout=30)
