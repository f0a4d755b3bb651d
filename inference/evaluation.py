"""How far a model's structure is from the one a clinician approved: MONAI's metrics on two
masks of one grid (Dice, the 95th percentile Hausdorff distance, surface Dice at a tolerance)
and the volume difference.

The masks are cropped to the bounding box of both (with a margin of one voxel) first: the
metrics only look at the structures and their surfaces, and a 500-slice grid would otherwise
be traced in full for each structure.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """The metrics of one structure: ours against the reference (the clinician's)."""

    dice: float
    hd95_mm: float | None  # None: one of the two is empty (undefined)
    surface_dice: float | None
    volume_ml: float  # ours
    reference_volume_ml: float

    @property
    def volume_difference_ml(self) -> float:
        """Ours minus the reference."""
        return self.volume_ml - self.reference_volume_ml


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = a | b
    if not both.any():
        return a, b
    box = []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        hit = np.flatnonzero(both.any(axis=other))
        box.append(slice(max(0, hit[0] - 1), min(a.shape[axis], hit[-1] + 2)))
    return np.pad(a[tuple(box)], 1), np.pad(b[tuple(box)], 1)


def compare(
    ours: np.ndarray,
    reference: np.ndarray,
    spacing_mm: tuple[float, ...],
    tolerance_mm: float = 2.0,
) -> Agreement:
    """``ours`` against ``reference`` (boolean, same (slices, rows, columns) grid);
    ``spacing_mm`` along those axes."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    if ours.shape != reference.shape:
        raise ValueError(f"masks of different grids: {ours.shape} and {reference.shape}")
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    volume, reference_volume = int(ours.sum()) * voxel_ml, int(reference.sum()) * voxel_ml
    a, b = _crop(ours.astype(bool), reference.astype(bool))

    def onehot(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    pred, ref = onehot(a), onehot(b)
    if not a.any() and not b.any():
        return Agreement(1.0, 0.0, 1.0, volume, reference_volume)
    dice = float(compute_dice(pred, ref, include_background=False)[0, 0])
    if not a.any() or not b.any():
        return Agreement(dice, None, None, volume, reference_volume)
    spacing = [float(s) for s in spacing_mm]
    with warnings.catch_warnings():  # MONAI's own deprecations, inside its metrics
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(
            compute_hausdorff_distance(
                pred, ref, include_background=False, percentile=95, spacing=spacing
            )[0, 0]
        )
        surface = float(
            compute_surface_dice(
                pred, ref, [tolerance_mm], include_background=False, spacing=spacing
            )[0, 0]
        )
    return Agreement(
        dice,
        hd95 if math.isfinite(hd95) else None,
        surface if math.isfinite(surface) else None,
        volume,
        reference_volume,
    )
