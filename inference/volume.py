"""Build a 3D volume in patient coordinates from a series of single-frame images.

Slices are sorted along the slice normal (not by InstanceNumber or file name), rescale
slope/intercept are applied, and the affine maps voxel indices (k, j, i) to patient
coordinates (LPS, mm). The sorted headers are kept: encoders reference exactly these images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class VolumeError(Exception):
    """The series cannot be turned into a volume; the message says why (no PHI)."""


@dataclass
class Volume:
    hu: np.ndarray  # int16, shape (slices, rows, columns), modality units (HU for CT)
    affine: np.ndarray  # 4x4: (k, j, i, 1) -> (x, y, z, 1) in LPS mm
    datasets: list[Dataset]  # source images, in the order of axis 0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (k, j, i)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel (the parallelepiped spanned by the affine's columns) in mL."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def read_headers(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read and sort the images of one series along the slice normal."""
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        raise VolumeError("the series has no instances")
    for ds in datasets:
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows"):
            if kw not in ds:
                raise VolumeError(f"instance {ds.get('SOPInstanceUID', '?')} has no {kw}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise VolumeError("multi-frame images are not supported by this pipeline yet")
    normal = slice_normal(datasets[0])
    first_iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    shape = (datasets[0].Rows, datasets[0].Columns)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), first_iop, atol=1e-3):
            raise VolumeError("the series mixes image orientations")
        if (ds.Rows, ds.Columns) != shape:
            raise VolumeError("the series mixes image sizes")
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = np.array(
        [np.dot(normal, np.asarray(d.ImagePositionPatient, float)) for d in datasets]
    )
    if len(positions) > 1 and np.min(np.diff(positions)) < 1e-3:
        raise VolumeError("the series has two images at the same position")
    return datasets


def affine_of(datasets: list[Dataset]) -> np.ndarray:
    """Index -> patient affine; the slice axis follows first-to-last image positions."""
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    if len(datasets) > 1:
        last = np.asarray(datasets[-1].ImagePositionPatient, dtype=float)
        step = (last - origin) / (len(datasets) - 1)
    else:
        step = slice_normal(first) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = iop[3:] * row_spacing  # j: down the rows
    affine[:3, 2] = iop[:3] * col_spacing  # i: along a row
    affine[:3, 3] = origin
    return affine


def build_volume(paths: Iterable[Path | str]) -> Volume:
    """Read, sort, decode and rescale a series into a :class:`Volume`."""
    datasets = read_headers(paths)
    hu = np.empty((len(datasets), datasets[0].Rows, datasets[0].Columns), dtype=np.int16)
    for index, ds in enumerate(datasets):
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(ts, "name", ts)
            raise VolumeError(f"cannot decode pixel data ({name}): {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = pixels.astype(np.float32) * slope + intercept
        hu[index] = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    return Volume(hu=hu, affine=affine_of(datasets), datasets=datasets)
