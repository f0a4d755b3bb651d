"""Input quality checks on a volume, before any model runs (see :mod:`airouter.core.qc`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from airouter.core.qc import QualityChecks
from inference.volume import Volume, slice_normal

AIR_WINDOW_HU = (-1500, -500)  # what may be air; below it: padding outside the scan circle
BORDER_TISSUE_HU = -500


@dataclass(frozen=True)
class QcFinding:
    """One failed check: its name, the value found and what was accepted (no PHI)."""

    check: str
    value: str
    accepted: str

    def describe(self) -> str:
        """``check: value (accepted: ...)`` as the job and the SR say it."""
        return f"{self.check}: {self.value} (accepted: {self.accepted})"


def positions_mm(volume: Volume) -> np.ndarray:
    """Each slice's position along the slice normal, in the volume's order."""
    normal = slice_normal(volume.datasets[0])
    return np.array(
        [float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))) for d in volume.datasets]
    )


def _tilt_deg(volume: Volume) -> float:
    """The largest of: the slice normal's angle to the nearest patient axis (an oblique
    plane), and the angle between the normal and the direction the slices are stacked in
    (gantry tilt)."""
    normal = slice_normal(volume.datasets[0])
    oblique = float(np.degrees(np.arccos(min(1.0, float(np.max(np.abs(normal)))))))
    stack = volume.affine[:3, 0]
    length = float(np.linalg.norm(stack))
    if len(volume.datasets) < 2 or length == 0:
        return oblique
    cosine = abs(float(np.dot(stack / length, normal)))
    return max(oblique, float(np.degrees(np.arccos(min(1.0, cosine)))))


def air_hu(hu: np.ndarray) -> float | None:
    """The HU of air: the 5th percentile of the voxels that may be air (on a 1-in-4 sample of
    rows and columns), or None where there is none."""
    sample = hu[:, ::4, ::4]
    low, high = AIR_WINDOW_HU
    air = sample[(sample > low) & (sample < high)]
    return float(np.percentile(air, 5)) if air.size else None


def truncated_by_fov(hu: np.ndarray, pixel_mm: float, run_mm: float) -> int:
    """Slices where tissue (HU > -500) runs along an image border for more than ``run_mm``:
    the field of view cuts the patient there (a table's edge crossing the border is short)."""
    run = max(2, round(run_mm / max(pixel_mm, 1e-3)))
    cut = np.zeros(hu.shape[0], dtype=bool)
    for edge in (hu[:, 0, :], hu[:, -1, :], hu[:, :, 0], hu[:, :, -1]):
        tissue = (edge > BORDER_TISSUE_HU).astype(np.int32)
        # the longest run of tissue along the edge, per slice, by a cumulative sum reset at gaps
        csum = np.cumsum(tissue, axis=1)
        reset = np.maximum.accumulate(np.where(tissue == 0, csum, 0), axis=1)
        cut |= (csum - reset).max(axis=1) > run
    return int(cut.sum())


def check_volume(volume: Volume, checks: QualityChecks) -> list[QcFinding]:
    """What fails of ``checks`` on ``volume`` (empty: all pass)."""
    found: list[QcFinding] = []
    count = len(volume.datasets)
    if checks.images is not None and not checks.images.holds(count):
        found.append(QcFinding("images", str(count), checks.images.describe()))
    if checks.duplicate_slices and volume.duplicates:
        found.append(QcFinding("duplicate_slices", f"{volume.duplicates} duplicated", "none"))
    if count > 1 and (checks.missing_slices or checks.spacing_tolerance_mm is not None):
        gaps = np.diff(positions_mm(volume))
        usual = float(np.median(gaps))
        # a gap within 30 % of a whole number of spacings is that many slices (one less missing)
        steps = np.maximum(1, np.floor(gaps / usual + 0.3)) if usual > 0 else np.ones_like(gaps)
        if checks.missing_slices:
            missing = int((steps - 1).sum())
            if missing:
                widest = float(gaps.max())
                found.append(
                    QcFinding(
                        "missing_slices",
                        f"{missing} missing (a gap of {widest:.2f} mm, spacing {usual:.2f} mm)",
                        "none",
                    )
                )
        if checks.spacing_tolerance_mm is not None:
            # departures from the usual spacing, counting whole missing slices as such
            off = float(np.max(np.abs(gaps - steps * usual)))
            if off > checks.spacing_tolerance_mm:
                found.append(
                    QcFinding(
                        "slice_spacing",
                        f"a departure of {off:.2f} mm from {usual:.2f} mm",
                        f"<= {checks.spacing_tolerance_mm:g} mm",
                    )
                )
    if checks.max_tilt_deg is not None:
        tilt = _tilt_deg(volume)
        if tilt > checks.max_tilt_deg:
            found.append(
                QcFinding("tilt", f"{tilt:.1f} degrees", f"<= {checks.max_tilt_deg:g} degrees")
            )
    spacing = [float(v) for v in volume.datasets[0].PixelSpacing]
    if checks.pixel_spacing_mm is not None and not all(
        checks.pixel_spacing_mm.holds(v) for v in spacing
    ):
        found.append(
            QcFinding(
                "pixel_spacing_mm",
                "x".join(f"{v:g}" for v in spacing),
                checks.pixel_spacing_mm.describe(),
            )
        )
    if checks.slice_thickness_mm is not None:
        value = volume.datasets[0].get("SliceThickness")
        thickness = float(value) if value not in (None, "") else volume.spacing_mm[0]
        if not checks.slice_thickness_mm.holds(thickness):
            found.append(
                QcFinding(
                    "slice_thickness_mm", f"{thickness:g}", checks.slice_thickness_mm.describe()
                )
            )
    if checks.air_hu is not None:
        air = air_hu(volume.hu)
        if air is None or not checks.air_hu.holds(air):
            found.append(
                QcFinding(
                    "air_hu",
                    "no voxel between -1500 and -500" if air is None else f"{air:.0f}",
                    checks.air_hu.describe(),
                )
            )
    if checks.max_truncated_slices is not None:
        cut = truncated_by_fov(volume.hu, min(spacing), checks.truncation_run_mm)
        if cut > checks.max_truncated_slices:
            found.append(
                QcFinding(
                    "truncated_fov",
                    f"the field of view cuts the patient on {cut} of {count} slices",
                    f"<= {checks.max_truncated_slices} slices",
                )
            )
    return found
