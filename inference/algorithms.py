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
MIN_BODY_ISLAND_MM2 = 100.0  # a body outline: one surface per slice, plus islands this large

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


def _edges(volume: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four image borders of every axial slice, each (slices, length)."""
    return volume[:, 0, :], volume[:, -1, :], volume[:, :, 0], volume[:, :, -1]


def _cut_spans(edge: np.ndarray) -> np.ndarray:
    """Along one border of every slice, the stretch from the first to the last pixel of the
    mask: where the field of view cuts through the patient."""
    length = edge.shape[1]
    touches = edge.any(axis=1)
    first = np.argmax(edge, axis=1)
    last = length - 1 - np.argmax(edge[:, ::-1], axis=1)
    index = np.arange(length)[None, :]
    return touches[:, None] & (index >= first[:, None]) & (index <= last[:, None])


def fill_holes_per_slice(mask: np.ndarray, truncated: bool = False) -> np.ndarray:
    """Fill enclosed holes in every axial slice (air inside the body belongs to the body).

    A hole is background not 4-connected, within its slice, to the slice's border: one
    labelling of the whole volume with an in-plane structuring element.

    With ``truncated``, the field of view may cut the patient: where the mask touches a
    border, the stretch of border between its first and last pixel there is taken as closed
    (the patient goes on beyond the image). Air that reaches the border only within such a
    stretch (a lung, bowel gas cut by the image edge) is then inside; air outside the patient
    reaches the border somewhere else, and stays outside.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~mask, structure=in_plane)
    outside = np.zeros(count + 1, dtype=bool)
    for labels, edge in zip(_edges(background), _edges(mask), strict=True):
        if truncated:
            labels = labels[~_cut_spans(edge)]
        outside[np.unique(labels)] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[background]


def truncated_slices(mask: np.ndarray) -> int:
    """On how many axial slices a mask touches the image border (the field of view cuts it)."""
    if mask.ndim != 3 or not mask.any():
        return 0
    touching = np.zeros(mask.shape[0], dtype=bool)
    for edge in _edges(mask):
        touching |= edge.any(axis=1)
    return int(touching.sum())


def drop_small_islands(mask: np.ndarray, affine: np.ndarray, min_mm2: float) -> np.ndarray:
    """Per axial slice, remove islands under ``min_mm2`` (specks that a threshold leaves),
    keeping each slice's largest island whatever its size."""
    pixel_mm2 = float(np.linalg.norm(affine[:3, 1]) * np.linalg.norm(affine[:3, 2]))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 2)
    labels, count = ndimage.label(mask, structure=in_plane)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes * pixel_mm2 >= min_mm2
    # each slice's largest island: its label is the one with the most pixels in that slice
    slices = ndimage.find_objects(labels)
    best: dict[int, tuple[int, int]] = {}
    for label, box in enumerate(slices, start=1):
        if box is None:
            continue
        k = box[0].start
        if k not in best or sizes[label] > best[k][1]:
            best[k] = (label, int(sizes[label]))
    for label, _ in best.values():
        keep[label] = True
    keep[0] = False
    return keep[labels]


def segment_body(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ct-body: the patient's outline. HU threshold, largest component, holes filled per slice
    (also where the field of view cuts the patient: lungs and bowel gas at the image border
    are inside), the table cut off where it touches the patient, and specks under
    MIN_BODY_ISLAND_MM2 dropped from each slice.

    Returns uint8 labels (0 background, 1 body).
    """
    body = fill_holes_per_slice(largest_component(hu > BODY_THRESHOLD_HU), truncated=True)
    if body.any():
        body = remove_thin_attachments(body, affine)
        body = drop_small_islands(body, affine, MIN_BODY_ISLAND_MM2)
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
