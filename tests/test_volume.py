"""Volumes from real series: sorted along the normal, rescaled, decoded whatever the syntax."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.volume import VolumeError, _native_pixels, _rescale_into, build_volume
from tests.peers import BODY_J2K, HEAD_SCOUT, SHARED_DICOM, head_ct_files


def test_head_ct_volume_is_sorted_and_rescaled() -> None:
    files = head_ct_files()
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    a, b = build_volume(files), build_volume(shuffled)
    assert a.hu.shape == (140, 512, 512)
    assert np.array_equal(a.hu, b.hu)
    z = [float(ds.ImagePositionPatient[2]) for ds in a.datasets]
    assert z == sorted(z)
    assert np.allclose(a.affine[:3, 3], a.datasets[0].ImagePositionPatient)
    assert a.spacing_mm == pytest.approx((1.0, 0.451171875, 0.451171875), rel=1e-3)
    corner = a.hu[:, :10, :10]
    assert -1030 < np.median(corner) < -970  # air, so the intercept (-1024) was applied


def test_jpeg2000_ct_is_decoded() -> None:
    volume = build_volume(sorted(BODY_J2K.iterdir()))
    assert volume.hu.shape == (20, 512, 512)
    assert volume.hu.min() == -1024 and volume.hu.max() > 1000


def test_series_that_is_not_a_volume_gives_a_reason() -> None:
    ct = head_ct_files()
    with pytest.raises(VolumeError, match="two images at the same position"):
        build_volume([ct[0], ct[0]])
    with pytest.raises(VolumeError, match="no instances"):
        build_volume([])
    scout = [p for p in HEAD_SCOUT.iterdir() if p.name != "DIRFILE"]
    with pytest.raises(VolumeError, match="mixes image"):
        build_volume([ct[0], *scout])


def _with_vr(source, keyword_tag: bytes, vr: bytes, out):  # type: ignore[no-untyped-def]
    """A copy of ``source`` (explicit VR little endian) with one element's VR replaced."""
    data = source.read_bytes()
    at = data.find(keyword_tag)
    assert at > 0
    out.write_bytes(data[: at + 4] + vr + data[at + 6 :])
    return out


def test_unreadable_or_malformed_geometry_is_a_reason_not_a_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pydicom converts values on first access: an unknown VR in a geometry attribute raised
    NotImplementedError wherever it was first read (an 'internal error' of the job)."""
    import pydicom

    ct = head_ct_files()[:3]
    iop = b"\x20\x00\x37\x00"  # (0020,0037) Image Orientation (Patient)
    odd = _with_vr(ct[1], iop, b"ZZ", tmp_path / "odd.dcm")
    uid = pydicom.dcmread(odd, stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(VolumeError, match=f"instance {uid}: ImageOrientationPatient is unreadable"):
        build_volume([ct[0], odd, ct[2]])
    ds = pydicom.dcmread(ct[1])
    ds.PixelSpacing = [0.5]
    ds.save_as(tmp_path / "one.dcm")
    with pytest.raises(VolumeError, match="PixelSpacing is malformed"):
        build_volume([ct[0], tmp_path / "one.dcm"])
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(VolumeError, match=r"cannot read junk\.dcm"):
        build_volume([ct[0], tmp_path / "junk.dcm"])


def test_a_series_too_large_to_decode_is_refused_before_decoding(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    ct = head_ct_files()[:2]
    for n, path in enumerate(ct):
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 65535  # 8 GB a slice, said by 4 bytes of header
        ds.save_as(tmp_path / f"{n}.dcm")
    with pytest.raises(VolumeError, match="decodes to 16383 MB, more than"):
        build_volume([tmp_path / "0.dcm", tmp_path / "1.dcm"])
    assert build_volume(ct, max_bytes=2 * 512 * 512 * 2).hu.shape == (2, 512, 512)
    with pytest.raises(VolumeError, match=r"more than inference\.max_volume_mb"):
        build_volume(ct, max_bytes=2 * 512 * 512 * 2 - 1)


def _every_image() -> list[Path]:
    """Every single-frame file of the shared data that pydicom decodes (all syntaxes, MR,
    CT, odd files)."""
    images = []
    for path in sorted(SHARED_DICOM.rglob("*")):
        if not path.is_file() or path.suffix in (".txt", ".md", ".json") or path.name == "LICENSE":
            continue
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds or int(ds.get("NumberOfFrames", 1) or 1) != 1:
                continue
            ds.pixel_array  # noqa: B018 - decodable at all
        except Exception:
            continue
        images.append(path)
    return images


def test_the_direct_read_of_native_pixels_is_pydicoms_decoding() -> None:
    """Uncompressed 16-bit images are read straight from Pixel Data (faster than pydicom's
    decoding): on every decodable image of the shared data the stored values and the
    rescaled HU equal pydicom's, and what the direct read does not take (other syntaxes,
    widths, signed narrow values, set padding bits) it leaves to pydicom."""
    taken = 0
    for path in _every_image():
        ds = pydicom.dcmread(path)
        direct = _native_pixels(ds)
        if direct is None:
            continue
        taken += 1
        expected = ds.pixel_array
        assert np.array_equal(direct, expected), path.name
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        out, reference = np.empty(direct.shape, np.int16), np.empty(direct.shape, np.int16)
        _rescale_into(out, direct, slope, intercept)
        floats = expected.astype(np.float32) * slope + intercept
        reference[...] = np.clip(np.rint(floats), -32768, 32767).astype(np.int16)
        assert np.array_equal(out, reference), path.name
    assert taken >= 140  # the head CT at least
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | 0x8000).tobytes()  # padding bits
    assert _native_pixels(ds) is None
    ds.PixelRepresentation = 1  # 12 stored bits, signed: pydicom's sign extension
    assert _native_pixels(ds) is None


def test_rescale_clips_and_rounds_as_the_float_path() -> None:
    pixels = np.array([[0, 1, 40000, 65535]], dtype=np.uint16)
    out = np.empty(pixels.shape, np.int16)
    _rescale_into(out, pixels, 1.0, -1024.0)
    assert out.tolist() == [[-1024, -1023, 32767, 32767]]
    _rescale_into(out, pixels, 0.5, -0.25)
    assert out.tolist() == [[0, 0, 20000, 32767]]
