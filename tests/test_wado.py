"""WADO-RS (PS3.18 10.4) of the real archive: instances, metadata, frames, bulk data and
rendered images, each Accept form, the 406s and the 400s; then dicomweb-client and Orthanc's
DICOMweb plugin (the node registered as its remote server) against the node as a process.

Data: real DICOM from ``../shared/dicom``, stored through STOW-RS: head CT slices (native
Explicit VR Little Endian), one chest CT slice in JPEG 2000, JPEG baseline, RLE and big
endian, and highdicom's binary SEG (1 bit, several frames) with the CT it segments."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from tests.peers import SHARED_DICOM, head_ct_files
from tests.test_stow import Api, _split_multipart

CHEST = SHARED_DICOM / "ts-chest-ct-16-syntaxes/testImages"
SYNTAXES = {
    "j2k": CHEST / "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
    "jpeg": CHEST / "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm",
    "rle": CHEST / "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
    "big": CHEST / "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
}
HIGHDICOM = SHARED_DICOM / "sr-seg-highdicom/data/test_files"
DICOM = 'multipart/related; type="application/dicom"'
OCTETS = 'multipart/related; type="application/octet-stream"'


def _stow(api: Api, ds: pydicom.Dataset, tmp: Path) -> None:
    buffer = tmp / "one.dcm"
    ds.save_as(buffer)
    answer = api.stow([("application/dicom", buffer.read_bytes())])
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Api, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("wado")
    api = Api(tmp)
    data: dict[str, Any] = {"ct": []}
    for path in head_ct_files()[:3]:
        ds = pydicom.dcmread(path)
        _stow(api, ds, tmp)
        data["ct"].append(ds)
    study, series = generate_uid(), generate_uid()
    for name, path in SYNTAXES.items():  # one image in four syntaxes: four instances
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        _stow(api, ds, tmp)
        data[name] = pydicom.dcmread(path)
        data[name].StudyInstanceUID, data[name].SeriesInstanceUID = study, series
        data[name].SOPInstanceUID = ds.SOPInstanceUID
    for name in ("ct_image", "seg_image_ct_binary"):
        ds = pydicom.dcmread(HIGHDICOM / f"{name}.dcm")
        _stow(api, ds, tmp)
        data[name] = ds
    return api, data


def _path(ds: pydicom.Dataset, tail: str = "") -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{tail}"
    )


def _get(api: Api, path: str, accept: str | None = None, status: int = 200) -> Any:
    headers = {"Accept": accept} if accept else {}
    answer = api.client.get(path, headers=headers)
    assert answer.status_code == status, (path, accept, answer.text[:500])
    return answer


def _part_types(response: Any) -> list[str]:
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    chunks = response.content.split(b"--" + boundary)[1:-1]
    return [c.split(b"\r\n\r\n", 1)[0].decode().strip() for c in chunks]


def test_instances_as_stored_or_transcoded(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct = data["ct"][0]
    stored = Path(head_ct_files()[0]).read_bytes()
    for accept in (None, DICOM, f"{DICOM}; transfer-syntax=*", "*/*"):
        assert _split_multipart(_get(api, _path(ct), accept)) == [stored], accept
    study = _get(api, f"/dicomweb/studies/{ct.StudyInstanceUID}")
    assert len(_split_multipart(study)) == 3
    series = _get(api, f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}")
    assert len(_split_multipart(series)) == 3

    j2k = data["j2k"]
    held = _split_multipart(_get(api, _path(j2k)))[0]
    assert pydicom.dcmread(io.BytesIO(held)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    answer = _get(api, _path(j2k), f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.1")
    assert 'transfer-syntax="1.2.840.10008.1.2.1"' in _part_types(answer)[0]
    decoded = pydicom.dcmread(io.BytesIO(_split_multipart(answer)[0]))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert decoded.SOPInstanceUID == j2k.SOPInstanceUID
    assert np.array_equal(decoded.pixel_array, j2k.pixel_array)  # lossless: the same pixels
    big = _get(api, _path(data["big"]), f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.1")
    assert np.array_equal(
        pydicom.dcmread(io.BytesIO(_split_multipart(big)[0])).pixel_array,
        data["big"].pixel_array,
    )

    # what cannot be given is a 406 that says what can
    refused = _get(api, _path(ct), f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.50", 406)
    assert refused.json()["status"] == 406 and "1.2.840.10008.1.2.1" in refused.json()["error"]
    _get(api, _path(ct), 'multipart/related; type="application/dicom+xml"', 406)
    _get(api, _path(ct), "image/png", 406)
    _get(api, _path(ct), f"{DICOM}; q=0", 406)
    # one instance on its own (single part) when application/dicom itself is asked
    single = _get(api, _path(ct), "application/dicom")
    assert single.headers["content-type"].startswith("application/dicom")
    assert single.content == stored
    transcoded = _get(api, _path(j2k), "application/dicom; transfer-syntax=1.2.840.10008.1.2.1")
    assert pydicom.dcmread(io.BytesIO(transcoded.content)).file_meta.TransferSyntaxUID == (
        "1.2.840.10008.1.2.1"
    )
    _get(api, "/dicomweb/studies/1.2.3.4", None, 404)
    _get(api, "/dicomweb/studies/not-a-uid", None, 400)


def test_metadata_at_each_level(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct = data["ct"][0]
    study = _get(api, f"/dicomweb/studies/{ct.StudyInstanceUID}/metadata").json()
    assert len(study) == 3
    series = _get(
        api, f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/metadata"
    ).json()
    assert {r["00080018"]["Value"][0] for r in series} == {
        str(d.SOPInstanceUID) for d in data["ct"]
    }
    answer = _get(api, _path(ct, "/metadata"), "application/dicom+json")
    assert answer.headers["content-type"] == "application/dicom+json"
    (one,) = answer.json()
    assert one["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": str(ct.PatientName)}]}
    assert one["00280010"]["Value"] == [ct.Rows]
    assert one["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
    pixel = one["7FE00010"]
    assert pixel["vr"] == "OW" and "InlineBinary" not in pixel
    assert pixel["BulkDataURI"].endswith(_path(ct, "/bulk/7FE00010"))
    # the BulkDataURI gives the value itself
    bulk_path = pixel["BulkDataURI"].split("testserver", 1)[1]
    bulk = _get(api, bulk_path, OCTETS)
    assert _split_multipart(bulk) == [ct.PixelData]
    single = _get(api, bulk_path, "application/octet-stream")  # on its own, as OHIF asks
    assert single.content == ct.PixelData
    _get(api, _path(ct, "/bulk/00100010"), None, 404)  # a name is no bulk data
    _get(api, _path(ct, "/bulk/zz"), None, 400)
    # the SEG: its segments' attributes are there, its frames are bulk data
    seg = data["seg_image_ct_binary"]
    (seg_json,) = _get(api, _path(seg, "/metadata")).json()
    assert len(seg_json["00620002"]["Value"]) == len(seg.SegmentSequence)
    assert seg_json["7FE00010"]["vr"] == "OB"
    _get(api, _path(ct, "/metadata"), "application/dicom+xml", 406)
    _get(api, f"/dicomweb/studies/{generate_uid()}/metadata", None, 404)


def test_frames_decoded_or_as_stored(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct = data["ct"][0]
    for accept in (None, OCTETS, f"{OCTETS}; transfer-syntax=1.2.840.10008.1.2.1"):
        answer = _get(api, _path(ct, "/frames/1"), accept)
        assert _split_multipart(answer) == [ct.PixelData]
        assert 'transfer-syntax="1.2.840.10008.1.2.1"' in _part_types(answer)[0]
    for name in ("j2k", "jpeg", "rle", "big"):
        ds = data[name]
        frame = _split_multipart(_get(api, _path(ds, "/frames/1")))[0]
        pixels = np.frombuffer(frame, ds.pixel_array.dtype.newbyteorder("<"))
        assert np.array_equal(pixels.reshape(ds.pixel_array.shape), ds.pixel_array), name
    j2k = data["j2k"]
    stored = _get(api, _path(j2k, "/frames/1"), f"{OCTETS}; transfer-syntax=*")
    assert _part_types(stored)[0].startswith("Content-Type: image/jp2")
    held = next(generate_frames(j2k.PixelData, number_of_frames=1))
    assert _split_multipart(stored) == [held]
    own = _get(api, _path(j2k, "/frames/1"), 'multipart/related; type="image/jp2"')
    assert _split_multipart(own) == [held]
    _get(api, _path(j2k, "/frames/1"), 'multipart/related; type="image/jpeg"', 406)
    _get(api, _path(ct, "/frames/1"), 'multipart/related; type="image/jls"', 406)

    # a 1-bit SEG: each frame is unpacked from the run of all frames and sent on its own
    seg = data["seg_image_ct_binary"]
    count = int(seg.NumberOfFrames)
    answer = _get(api, _path(seg, "/frames/" + ",".join(str(n) for n in range(1, count + 1))))
    frames = _split_multipart(answer)
    assert len(frames) == count
    masks = seg.pixel_array.reshape(count, seg.Rows, seg.Columns)
    for n, frame in enumerate(frames):
        bits = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        assert np.array_equal(bits[: seg.Rows * seg.Columns].reshape(masks[n].shape), masks[n])
    _get(api, _path(seg, f"/frames/{count + 1}"), None, 404)
    _get(api, _path(ct, "/frames/0"), None, 400)
    _get(api, _path(ct, "/frames/1,x"), None, 400)


def test_rendered_images(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct = data["ct"][0]
    jpeg = _get(api, _path(ct, "/rendered"))
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    assert "max-age" in jpeg.headers["cache-control"]  # the dashboard asks again and again
    assert Image.open(io.BytesIO(jpeg.content)).size == (ct.Columns, ct.Rows)
    png = _get(api, _path(ct, "/rendered"), "image/png")
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    thumb = Image.open(io.BytesIO(_get(api, _path(ct, "/rendered?viewport=64,64")).content))
    assert max(thumb.size) == 64
    # a window changes what is shown: a narrow bone window blacks out soft tissue
    soft = np.asarray(
        Image.open(io.BytesIO(_get(api, _path(ct, "/rendered?window=40,400"), "image/png").content))
    )
    bone = np.asarray(
        Image.open(
            io.BytesIO(_get(api, _path(ct, "/rendered?window=1500,300"), "image/png").content)
        )
    )
    assert soft.mean() > bone.mean() + 10
    frame = _get(api, _path(data["seg_image_ct_binary"], "/frames/1/rendered"), "image/png")
    mask = np.asarray(Image.open(io.BytesIO(frame.content)))
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert _get(api, _path(data["j2k"], "/rendered")).content[:2] == b"\xff\xd8"
    series = f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
    small = Image.open(io.BytesIO(_get(api, f"{series}/thumbnail").content))
    assert max(small.size) == 128
    assert _get(api, _path(ct, "/thumbnail"), "image/png").content[:4] == b"\x89PNG"
    _get(api, _path(ct, "/rendered"), "application/pdf", 406)
    _get(api, _path(ct, "/rendered?window=abc"), None, 400)
    _get(api, _path(ct, "/rendered?viewport=0,10"), None, 400)
    _get(api, _path(ct, "/rendered?quality=500"), None, 400)
    _get(api, _path(ct, "/frames/2/rendered"), None, 404)
    _get(api, _path(ct, "/frames/1,2/rendered"), None, 400)


def test_dicomweb_client_and_orthanc_retrieve_through_a_running_node(tmp_path: Path) -> None:
    """dicomweb-client and Orthanc's DICOMweb plugin, with the node as its remote DICOMweb
    server, find and retrieve a study through the node as a process."""
    from dicomweb_client.api import DICOMwebClient

    from tests.peers import start_node, start_orthanc, stop_process, storescu, wait_for

    (tmp_path / "no-rules").mkdir()
    node = start_node(
        tmp_path / "node", None, wait_triton=False, router={"rules_dir": str(tmp_path / "no-rules")}
    )
    orthanc = None
    try:
        files = head_ct_files()[:3]
        assert storescu(node.dimse_port, files).returncode == 0
        first = pydicom.dcmread(files[0])
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        client = DICOMwebClient(url=f"{node.url}/dicomweb")
        wait_for(lambda: len(client.search_for_instances(study_instance_uid=study)) == 3, 30, "3")
        instances = client.retrieve_study(study)
        assert {d.SOPInstanceUID for d in instances} == {
            pydicom.dcmread(f).SOPInstanceUID for f in files
        }
        metadata = client.retrieve_series_metadata(study, series)
        assert len(metadata) == 3
        sop = str(first.SOPInstanceUID)
        (frame,) = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
        assert frame == first.PixelData
        rendered = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
        assert rendered[:4] == b"\x89PNG"
        one = next(m for m in metadata if m["00080018"]["Value"][0] == sop)
        (bulk,) = client.retrieve_bulkdata(one["7FE00010"]["BulkDataURI"])
        assert bulk == first.PixelData

        orthanc = start_orthanc(
            tmp_path / "orthanc",
            extra={
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "Servers": {"airouter": [f"{node.url}/dicomweb/"]},
                }
            },
        )
        found = orthanc.post(
            "/dicom-web/servers/airouter/qido",
            {"Uri": "/studies", "Arguments": {"StudyInstanceUID": study}},
        )
        # Orthanc gives each attribute its Name and one Value (what the node answered)
        assert [r["0020000D"]["Value"] for r in found] == [study]
        orthanc.post("/dicom-web/servers/airouter/retrieve", {"Resources": [{"Study": study}]})
        stored = orthanc.get("/instances")
        assert len(stored) == 3
        tags = orthanc.get(f"/instances/{stored[0]}/simplified-tags")
        assert tags["StudyInstanceUID"] == study
    finally:
        if orthanc is not None:
            stop_process(orthanc.process)
        stop_process(node.process)
    assert "Traceback" not in node.log_text()
