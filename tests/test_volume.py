"""Volumes from real series: sorted along the normal, rescaled, decoded whatever the syntax."""

from __future__ import annotations

import random

import numpy as np
import pytest

from inference.volume import VolumeError, build_volume
from tests.peers import BODY_J2K, HEAD_SCOUT, head_ct_files


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
