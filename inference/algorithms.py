"""The bundled classic CT models, as plain numpy/scipy functions.

They run inside Triton's Python backend (``inference/model_repository``); they are kept here,
importable and testable without a server.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500
AIR_THRESHOLD_HU = -400
MIN_LUNG_ML = 250.0
BONE_THRESHOLD_HU = 300
TABLE_RADIUS_MM = 8.0  # the table and holders are thinner than 16 mm
MAX_ENCLOSED_FRACTION = 0.5

# Label values of the models' outputs; the model cards name them.
BODY = 1
RIGHT_LUNG = 1
LEFT_LUNG = 2


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of ``affine`` in mL."""
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a 3D mask (empty if the mask is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in every axial slice (air inside the body belongs to the body).

    A hole is background not 4-connected, within its slice, to the slice's border: one
    labelling of the whole volume with an in-plane structuring element.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~mask, structure=in_plane)
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (
        background[:, 0, :],
        background[:, -1, :],
        background[:, :, 0],
        background[:, :, -1],
    ):
        outside[np.unique(edge)] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[background]


def segment_body(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ct-body: the patient's outline. HU threshold, largest component, the table cut off where
    it touches the patient, holes filled per slice.

    Returns uint8 labels (0 background, 1 body).
    """
    body = fill_holes_per_slice(largest_component(hu > BODY_THRESHOLD_HU))
    if body.any():
        body = remove_thin_attachments(body, affine)
    return body.astype(np.uint8) * BODY


def remove_thin_attachments(
    mask: np.ndarray, affine: np.ndarray, radius_mm: float = TABLE_RADIUS_MM
) -> np.ndarray:
    """Cut structures thinner than ``2 * radius_mm`` in the axial plane (the table, head
    holders, cables) where they touch the patient: an in-plane opening (erosion then dilation
    by a disk, as distance transforms) on a ~2 mm grid; the mask keeps its full resolution
    within the opening's reach."""
    pixel_mm = float(min(np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 2])))
    step = max(1, round(2.0 / max(pixel_mm, 1e-3)))
    coarse = mask[:, ::step, ::step]
    sampling = (1e4, pixel_mm * step, pixel_mm * step)  # no reach across slices
    core = ndimage.distance_transform_edt(coarse, sampling=sampling) > radius_mm
    if not core.any():
        return mask
    core = largest_component(core)  # the patient's core; what the opening cut off stays off
    near = ndimage.distance_transform_edt(~core, sampling=sampling) <= radius_mm + pixel_mm * step
    full = np.repeat(np.repeat(near, step, axis=1), step, axis=2)
    return mask & full[:, : mask.shape[1], : mask.shape[2]]


def segment_lungs(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ct-lungs: air regions inside the body of at least MIN_LUNG_ML, split left/right.

    The split is the body's sagittal midline in patient coordinates (LPS: +x is the patient's
    left). Returns uint8 labels (0 background, 1 right lung, 2 left lung); empty for a study
    without lungs (a head CT), which is a result, not an error.
    """
    body = segment_body(hu, affine).astype(bool)
    air = (hu < AIR_THRESHOLD_HU) & body
    labels, count = ndimage.label(air)
    out = np.zeros(hu.shape, dtype=np.uint8)
    if count == 0:
        return out
    sizes_ml = np.bincount(labels.ravel()) * voxel_ml(affine)
    sizes_ml[0] = 0
    # Air enclosed by a closed ring of bone in its slices is intracranial (a skull), not lung:
    # ribs, spine and sternum do not close a ring around the lungs in an axial slice.
    enclosed = np.bincount(labels[_inside_bone_ring(hu)], minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    lung_like = (sizes_ml >= MIN_LUNG_ML) & (enclosed < MAX_ENCLOSED_FRACTION * sizes)
    lung_like[0] = False
    keep = lung_like[labels]  # a lookup per voxel (np.isin sorts: much slower)
    if not keep.any():
        return out
    x = _patient_x(affine, hu.shape)
    midline = _mean_x(body, affine)
    left = keep & (x >= midline)
    out[keep] = RIGHT_LUNG
    out[left] = LEFT_LUNG
    return out


def _inside_bone_ring(hu: np.ndarray) -> np.ndarray:
    """Voxels enclosed by bone (HU > BONE_THRESHOLD_HU) within their axial slice."""
    bone = hu > BONE_THRESHOLD_HU
    return fill_holes_per_slice(bone) & ~bone


def _patient_x(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Patient x (LPS) of every voxel, broadcastable to ``shape``."""
    k = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.float32(affine[0, 0])
    j = np.arange(shape[1], dtype=np.float32)[None, :, None] * np.float32(affine[0, 1])
    i = np.arange(shape[2], dtype=np.float32)[None, None, :] * np.float32(affine[0, 2])
    return k + j + i + np.float32(affine[0, 3])


def _mean_x(mask: np.ndarray, affine: np.ndarray) -> float:
    k, j, i = (idx.astype(np.float64).mean() for idx in np.nonzero(mask))
    return float(affine[0, 0] * k + affine[0, 1] * j + affine[0, 2] * i + affine[0, 3])
