"""Our SEG, SR and RTSTRUCT in a real PACS: Orthanc accepts them by C-STORE and by STOW-RS and
returns them by WADO-RS with their data sets unchanged."""

from __future__ import annotations

import io
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from encoders.common import Provenance, SeriesIdentity
from encoders.seg import build_probability_seg, build_seg
from inference.cards import load_cards
from tests.objects import build_all, dataset_bytes, structure
from tests.peers import ROOT, head_ct_files, start_orthanc, stop_process

pytestmark = pytest.mark.integration


def _objects() -> list[pydicom.Dataset]:
    images = [pydicom.dcmread(f) for f in head_ct_files()[60:66]]
    cards = load_cards(ROOT / "config" / "models")
    mask = np.zeros((6, 512, 512), dtype=bool)
    mask[1:5, 150:350, 150:350] = True
    mask[1:5, 220:280, 220:280] = False
    structures = [structure(cards["ct-body"], cards["ct-body"].labels[0], mask)]
    prov = Provenance("Test Maker", "test-model", "1", "SN")
    seg, sr, rt = build_all(images, structures, prov)
    labelmap = build_seg(
        source_images=images,
        structures=structures,
        provenance=prov,
        series=SeriesIdentity(hd.UID(), 905, "AI label map", hd.UID()),
        seg_type="labelmap",
    )
    fractional = build_probability_seg(
        source_images=images,
        structures=[replace(structures[0], probability=(mask * 200).astype(np.uint8))],
        provenance=prov,
        series=SeriesIdentity(hd.UID(), 904, "AI probability map", hd.UID()),
    )
    out = []
    for ds in (seg, sr, rt, labelmap, fractional):  # as the node archives them: a DICOM file
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    return out


def _multipart_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def _wado(url: str) -> bytes:
    request = urllib.request.Request(
        url, headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        content_type = response.headers["Content-Type"]
        body = response.read()
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    (part,) = body.split(b"--" + boundary)[1:-1]
    return part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")


@pytest.mark.parametrize("transport", ["C-STORE", "STOW-RS"])
def test_orthanc_accepts_and_returns_our_objects_unchanged(tmp_path: Path, transport: str) -> None:
    # Orthanc 1.10 predates the Label Map Segmentation SOP Class (2024): like any PACS of that
    # age it must be told to accept storage SOP classes it does not know.
    orthanc = start_orthanc(tmp_path / "orthanc", extra={"UnknownSopClassAccepted": True})
    try:
        objects = _objects()
        if transport == "C-STORE":
            ae = AE(ae_title="AIROUTER")
            for ds in objects:
                ae.add_requested_context(ds.SOPClassUID, ["1.2.840.10008.1.2.1"])
            assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
            assert assoc.is_established
            try:
                for ds in objects:
                    assert int(assoc.send_c_store(ds).Status) == 0
            finally:
                assoc.release()
        else:
            boundary = uuid.uuid4().hex
            body = b""
            for ds in objects:
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                body += (
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + buffer.getvalue()
                    + b"\r\n"
                )
            body += f"--{boundary}--\r\n".encode()
            request = urllib.request.Request(
                f"{orthanc.url}/dicom-web/studies",
                data=body,
                method="POST",
                headers={
                    "Content-Type": _multipart_type(boundary),
                    "Accept": "application/dicom+json",
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        for ds in objects:
            url = (
                f"{orthanc.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            )
            back = _wado(url)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert dataset_bytes(back) == dataset_bytes(buffer.getvalue()), ds.Modality
    finally:
        stop_process(orthanc.process)
