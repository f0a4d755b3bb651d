"""The bundled classic CT models, as plain numpy/scipy functions.

They run inside Triton's Python backend (``inference/model_repository``); they are kept here,
importable and testable without a server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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


SLAB = 16  # slices processed at a time by the per-slice operations (bounded memory)


LABEL_SLAB = 64  # slices labelled at a time: scipy's label keeps 8 bytes per voxel meanwhile


@dataclass
class _Components:
    """The 6-connected components of a 3D mask, labelled ``slab`` slices at a time.

    scipy's ``label`` works on an int64 array of the whole input whatever output it is
    given (2 GB for a 1,000-slice 512x512 CT); here each slab is labelled on its own
    (``local``, uint16), and the labels that touch across a slab boundary (the same row and
    column on the two slices) are joined as a graph's connected components: ``ids`` maps
    ``offsets[n] + local label`` of slab ``n`` to its component (1 ... ``count``; 0 the
    background). The components are scipy's, numbered differently."""

    local: np.ndarray
    slab: int
    offsets: list[int]
    ids: np.ndarray
    count: int

    def _tables(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first slice, local label -> component) of each slab."""
        for n, k in enumerate(range(0, len(self.local), self.slab)):
            top = self.offsets[n + 1] - self.offsets[n]
            table = np.zeros(top + 1, dtype=np.int64)
            table[1:] = self.ids[self.offsets[n] + 1 : self.offsets[n + 1] + 1]
            yield k, table

    def sizes(self) -> np.ndarray:
        """Voxels per component (index 0: the background)."""
        sizes = np.zeros(self.count + 1, dtype=np.int64)
        for k, table in self._tables():
            counts = np.bincount(self.local[k : k + self.slab].ravel(), minlength=len(table))
            np.add.at(sizes, table, counts[: len(table)])
        return sizes

    def relabel(self, values: np.ndarray) -> np.ndarray:
        """``values[component]`` for every voxel, in ``values``' type; uses up ``local``
        (written in place where the type has its size)."""
        same = values.dtype.itemsize == self.local.dtype.itemsize
        out = self.local.view(values.dtype) if same else np.empty(self.local.shape, values.dtype)
        for k, table in self._tables():
            out[k : k + self.slab] = values[table][self.local[k : k + self.slab]]
        return out


def _components(mask: np.ndarray, slab: int = LABEL_SLAB) -> _Components:
    """The components of ``mask`` (see :class:`_Components`)."""
    local = np.empty(mask.shape, dtype=np.uint16)
    offsets = [0]
    for k in range(0, len(mask), slab):
        part, count = ndimage.label(mask[k : k + slab])
        if count > np.iinfo(np.uint16).max:  # a slab of more components than uint16 holds
            whole, total = ndimage.label(mask)
            return _Components(whole, len(mask), [0, int(total)], np.arange(total + 1), total)
        local[k : k + slab] = part
        offsets.append(offsets[-1] + int(count))
    total = offsets[-1]
    heads, tails = [], []
    for n, k in enumerate(range(slab, len(mask), slab), start=1):
        below, above = local[k - 1], local[k]
        both = (below > 0) & (above > 0)
        if both.any():
            pairs = np.unique(np.stack([below[both], above[both]], axis=1), axis=0)
            heads.append(pairs[:, 0].astype(np.int64) + offsets[n - 1])
            tails.append(pairs[:, 1].astype(np.int64) + offsets[n])
    if heads:
        a, b = np.concatenate(heads), np.concatenate(tails)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(total + 1,) * 2)
        _, component = connected_components(graph, directed=False)
    else:
        component = np.arange(total + 1)
    _, ids = np.unique(component, return_inverse=True)  # compact numbering
    background = ids[0]
    ids = np.where(ids == background, 0, np.where(ids == 0, background, ids))
    return _Components(local, slab, offsets, ids, int(ids.max()) if total else 0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a 3D mask (empty if the mask is empty)."""
    found = _components(mask)
    if found.count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = found.sizes()
    sizes[0] = 0
    keep = np.zeros(found.count + 1, dtype=bool)
    keep[int(np.argmax(sizes))] = True
    return found.relabel(keep)


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
    out = np.empty(mask.shape, dtype=bool)
    for k in range(0, len(mask), SLAB):  # in-plane connectivity: slabs are independent
        out[k : k + SLAB] = _fill_slab(mask[k : k + SLAB], truncated)
    return out


_IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_4[1] = ndimage.generate_binary_structure(2, 1)


def _fill_slab(mask: np.ndarray, truncated: bool) -> np.ndarray:
    background, count = ndimage.label(~mask, structure=_IN_PLANE_4)
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
    eight = ndimage.generate_binary_structure(2, 2)
    out = np.zeros(mask.shape, dtype=bool)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        labels, count = ndimage.label(mask[k], structure=eight)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes * pixel_mm2 >= min_mm2
        sizes[0] = 0
        keep[int(np.argmax(sizes))] = True  # the slice's largest island, whatever its size
        keep[0] = False
        out[k] = keep[labels]
    return out


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
    return body.view(np.uint8)  # True is 1 (BODY): the same bytes, no copy


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

    def edt(volume: np.ndarray) -> np.ndarray:  # slab by slab: its index arrays stay small
        out = np.empty(volume.shape, dtype=np.float32)
        for k in range(0, len(volume), SLAB):
            out[k : k + SLAB] = ndimage.distance_transform_edt(
                volume[k : k + SLAB], sampling=sampling
            )
        return out

    core = edt(coarse) > radius_mm
    if not core.any():
        return mask
    core = largest_component(core)  # the patient's core; what the opening cut off stays off
    near = edt(~core) <= radius_mm + pixel_mm * step
    out = np.empty(mask.shape, dtype=bool)
    rows, columns = mask.shape[1:]
    for k in range(0, len(mask), SLAB):
        full = np.repeat(np.repeat(near[k : k + SLAB], step, axis=1), step, axis=2)
        out[k : k + SLAB] = mask[k : k + SLAB] & full[:, :rows, :columns]
    return out


def segment_lungs(hu: np.ndarray, affine: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """ct-lungs: air regions inside the body of at least MIN_LUNG_ML, split left/right.

    The split is the body's sagittal midline in patient coordinates (LPS: +x is the patient's
    left). Returns uint8 labels (0 background, 1 right lung, 2 left lung); empty for a study
    without lungs (a head CT), which is a result, not an error. ``body``: ct-body's mask of
    this volume (0/1) when the caller has it, so that it is not computed a second time.
    """
    if body is None:
        body = segment_body(hu, affine).view(bool)
    elif body.shape != hu.shape or body.dtype.itemsize != 1:
        raise ValueError(f"a body mask of {body.shape} {body.dtype} for a {hu.shape} volume")
    else:
        body = body.view(bool)
    midline = _mean_x(body, affine) if body.any() else 0.0
    air = hu < AIR_THRESHOLD_HU
    air &= body
    del body
    found = _components(air)
    del air
    out = np.zeros(hu.shape, dtype=np.uint8)
    if found.count == 0:
        return out
    # only the components large enough to be a lung are numbered (a CT's air holds tens of
    # thousands of small pockets): their labels fit in uint16 and replace the slabs' own
    all_sizes = found.sizes()
    big = np.flatnonzero(all_sizes * voxel_ml(affine) >= MIN_LUNG_ML)
    big = big[big > 0]
    if big.size == 0:
        return out
    renumber = np.zeros(found.count + 1, dtype=np.uint16)
    renumber[big] = np.arange(1, big.size + 1)
    labels, count = found.relabel(renumber), int(big.size)
    del found
    sizes = np.concatenate([[0], all_sizes[big]])
    sizes_ml = sizes * voxel_ml(affine)
    # Air enclosed by a closed ring of bone in its slices is intracranial (a skull), not lung:
    # ribs, spine and sternum do not close a ring around the lungs in an axial slice.
    enclosed = np.zeros(count + 1, dtype=np.int64)
    for k in range(0, len(hu), SLAB):
        ring = _inside_bone_ring(hu[k : k + SLAB])
        enclosed += np.bincount(labels[k : k + SLAB][ring], minlength=count + 1)
    lung_like = (sizes_ml >= MIN_LUNG_ML) & (enclosed < MAX_ENCLOSED_FRACTION * sizes)
    lung_like[0] = False
    if not lung_like.any():
        return out
    for k in range(0, len(hu), SLAB):  # a lookup per voxel (np.isin sorts: much slower)
        keep = lung_like[labels[k : k + SLAB]]
        if not keep.any():
            continue
        x = _patient_x(affine, keep.shape, first=k)
        slab = out[k : k + SLAB]
        slab[keep] = RIGHT_LUNG
        slab[keep & (x >= midline)] = LEFT_LUNG
    return out


def _inside_bone_ring(hu: np.ndarray) -> np.ndarray:
    """Voxels enclosed by bone (HU > BONE_THRESHOLD_HU) within their axial slice."""
    bone = hu > BONE_THRESHOLD_HU
    return fill_holes_per_slice(bone) & ~bone


def _patient_x(affine: np.ndarray, shape: tuple[int, ...], first: int = 0) -> np.ndarray:
    """Patient x (LPS) of every voxel of a block of ``shape`` starting at slice ``first``."""
    k = np.arange(first, first + shape[0], dtype=np.float32)[:, None, None] * np.float32(
        affine[0, 0]
    )
    j = np.arange(shape[1], dtype=np.float32)[None, :, None] * np.float32(affine[0, 1])
    i = np.arange(shape[2], dtype=np.float32)[None, None, :] * np.float32(affine[0, 2])
    return k + j + i + np.float32(affine[0, 3])


def _mean_x(mask: np.ndarray, affine: np.ndarray) -> float:
    """The mean patient x of a mask's voxels, from its counts along each axis (never the
    voxels' index arrays: three int64 copies of a half-full 1,000-slice mask are 3 GB)."""
    total = float(np.count_nonzero(mask))
    k, j, i = (
        float(np.dot(np.arange(n), mask.sum(axis=axes, dtype=np.int64))) / total
        for n, axes in ((mask.shape[0], (1, 2)), (mask.shape[1], (0, 2)), (mask.shape[2], (0, 1)))
    )
    return float(affine[0, 0] * k + affine[0, 1] * j + affine[0, 2] * i + affine[0, 3])
