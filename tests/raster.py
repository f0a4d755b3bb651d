"""Test-side geometry, written independently of the encoders: sort a CT, rasterize RTSTRUCT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from skimage.draw import polygon


def sorted_ct(files: Sequence[Path]) -> list[Dataset]:
    """Headers sorted along the slice normal."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(headers[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(
        headers, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float)))
    )


def rasterize_rtstruct(rt: Dataset, ct: Sequence[Dataset]) -> dict[str, np.ndarray]:
    """Each ROI's contours filled on the CT grid; nested contours combine by even-odd (XOR)."""
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(ct)}
    shape = (len(ct), int(ct[0].Rows), int(ct[0].Columns))
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    out: dict[str, np.ndarray] = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for contour in getattr(roi, "ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            image = ct[k]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            iop = np.asarray(image.ImageOrientationPatient, float)
            offset = points - np.asarray(image.ImagePositionPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            assert np.abs(offset @ normal).max() < 0.01, "contour point off its image plane"
            cols = offset @ iop[:3] / float(image.PixelSpacing[1])
            rows = offset @ iop[3:] / float(image.PixelSpacing[0])
            rr, cc = polygon(rows, cols, shape[1:])
            filled = np.zeros(shape[1:], dtype=bool)
            filled[rr, cc] = True
            mask[k] ^= filled
        out[names[roi.ReferencedROINumber]] = mask
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
