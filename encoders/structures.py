"""Structure sets read back: the ROIs of an RTSTRUCT (ours, or one a planning system or PACS
sends back after a clinician approved or edited it) filled on the voxel grid of the series
it delineates, the inverse of :mod:`encoders.rtstruct`.

Each CLOSED_PLANAR contour is mapped to voxel indices by the volume's affine (its slice found
by position, so a contour without a Contour Image Sequence is placed too); the pixels whose
centres lie inside it are set (scikit-image's polygon fill), and nested contours of a slice
combine by even-odd (an inner contour is a hole), as PS3.3 C.8.8.6 allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from skimage.draw import polygon

from encoders.common import EncodeError


@dataclass(frozen=True)
class Roi:
    """One ROI of a structure set: its number, name, code (scheme, value) and what made it."""

    number: int
    name: str
    code: tuple[str, str] | None
    generation: str  # ROI Generation Description (ours: "<model> <version>")
    interpreted_type: str


def rois(ds: Dataset) -> list[Roi]:
    """The ROIs of an RTSTRUCT, with the code and type of their observations."""
    observed: dict[int, Dataset] = {
        int(o.ReferencedROINumber): o for o in ds.get("RTROIObservationsSequence", [])
    }
    out = []
    for roi in ds.get("StructureSetROISequence", []):
        obs = observed.get(int(roi.ROINumber))
        code = None
        if obs is not None and obs.get("RTROIIdentificationCodeSequence"):
            c = obs.RTROIIdentificationCodeSequence[0]
            code = (str(c.CodingSchemeDesignator), str(c.CodeValue))
        out.append(
            Roi(
                number=int(roi.ROINumber),
                name=str(roi.get("ROIName", "") or ""),
                code=code,
                generation=str(roi.get("ROIGenerationDescription", "") or ""),
                interpreted_type=str(obs.get("RTROIInterpretedType", "")) if obs else "",
            )
        )
    return out


def referenced_series(ds: Dataset) -> set[str]:
    """The Series Instance UIDs the structure set says it delineates."""
    found = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                found.add(str(series.SeriesInstanceUID))
    return found


def rasterize(ds: Dataset, affine: np.ndarray, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """ROI number -> boolean mask of ``shape`` (slices, rows, columns) on the grid ``affine``
    maps from (k, j, i) to LPS mm. A contour off every slice plane (more than a tenth of the
    slice spacing), or not closed and planar, is an :class:`EncodeError` naming the ROI."""
    to_voxels = np.linalg.inv(affine)
    out: dict[int, np.ndarray] = {}
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", ""))
            if kind == "POINT":
                continue  # a marker, not a region
            if kind != "CLOSED_PLANAR":
                raise EncodeError(f"ROI {number}: a {kind or 'untyped'} contour has no area")
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            kji = (to_voxels @ np.c_[points, np.ones(len(points))].T)[:3].T
            k = float(np.round(kji[:, 0].mean()))
            if np.abs(kji[:, 0] - k).max() > 0.1 or not 0 <= k < shape[0]:
                raise EncodeError(f"ROI {number}: a contour lies off the image planes")
            rr, cc = polygon(kji[:, 1], kji[:, 2], shape[1:])
            filled = np.zeros(shape[1:], dtype=bool)
            filled[rr, cc] = True
            mask[int(k)] ^= filled
        out[number] = mask
    return out
