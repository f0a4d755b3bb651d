"""The bundled classic CT models, as plain numpy/scipy functions.

They run inside Triton's Python backend (``inference/model_repository``); they are kept here,
importable and testable without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from inference.blocks import (
    block_area,
    block_counts,
    combine,
    count_type,
    grid_shape,
    grid_step,
)

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

    def sizes(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Voxels per component (index 0: the background); with ``weights`` (one per voxel),
        their sum per component."""
        sizes = np.zeros(self.count + 1, dtype=np.int64)
        for k, table in self._tables():
            local = self.local[k : k + self.slab].ravel()
            weight = None if weights is None else weights[k : k + self.slab].ravel()
            counts = np.bincount(local, weights=weight, minlength=len(table))
            np.add.at(sizes, table, counts[: len(table)].astype(np.int64))
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
    keeping each slice's largest island whatever its size. In place; returns ``mask``.

    Islands are 4-connected, as the RTSTRUCT's contours are (``encoders/contours.py``: pixels
    that touch only at a corner are two contours)."""
    pixel_mm2 = float(np.linalg.norm(affine[:3, 1]) * np.linalg.norm(affine[:3, 2]))
    for k, where in _boxes(mask, margin=0):
        box = mask[k][where]  # a view
        labels, count = ndimage.label(box)
        if count < 2:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes * pixel_mm2 >= min_mm2
        sizes[0] = 0
        keep[int(np.argmax(sizes))] = True  # the slice's largest island, whatever its size
        keep[0] = False
        box[...] = keep[labels]
    return mask


def segment_body(hu: np.ndarray, affine: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ct-body: the patient's outline. HU threshold, largest component, holes filled per slice
    (also where the field of view cuts the patient: lungs and bowel gas at the image border
    are inside), the table cut off where it touches the patient, and specks under
    MIN_BODY_ISLAND_MM2 dropped from each slice.

    The component and the holes are found on the ~2 mm grid (``inference.blocks``: a block
    holds tissue if one of its pixels does); the outline is drawn at full resolution: inside
    the grid's body, a block away from the outside air, every pixel is the body's (holes
    included), and on the blocks at the outside air the pixels above the threshold are.

    Returns uint8 labels (0 background, 1 body), written into ``out`` if given (a uint8 or
    bool array of the volume's shape that the caller keeps between volumes: memory touched
    for the first time is slow on a VM).
    """
    if out is not None and (out.shape != hu.shape or out.dtype.itemsize != 1):
        raise ValueError(f"an output of {out.shape} {out.dtype} for a {hu.shape} volume")
    step = grid_step(affine)
    # the one full-size array, the answer: the threshold first, then what the grid decides
    body = np.empty(hu.shape, dtype=bool) if out is None else out.view(bool)
    tissue = np.empty(grid_shape(hu.shape, step), dtype=bool)
    for k in range(0, len(hu), SLAB):
        part = body[k : k + SLAB]
        np.greater(hu[k : k + SLAB], BODY_THRESHOLD_HU, out=part)
        tissue[k : k + SLAB] = block_counts(part, step) > 0
    filled = fill_holes_per_slice(largest_component(tissue), truncated=True)
    del tissue
    if not filled.any():
        body[...] = False
        return body.view(np.uint8)
    inner = _inner_blocks(filled, step)
    for k in range(0, len(hu), SLAB):
        part = body[k : k + SLAB]
        combine(part, inner[k : k + SLAB], step, np.logical_or)
        combine(part, filled[k : k + SLAB], step, np.logical_and)
    del inner, filled
    remove_thin_attachments(body, affine)
    drop_small_islands(body, affine, MIN_BODY_ISLAND_MM2)
    return body.view(np.uint8)  # True is 1 (BODY): the same bytes, no copy


_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True


def _inner_blocks(filled: np.ndarray, step: int) -> np.ndarray:
    """The blocks of ``filled`` whose in-plane neighbours are all in it (the image border
    counts as inside: the field of view may cut the patient). At full resolution (``step``
    1) the 4 neighbours: a hole, not 4-connected to the outside, is then always inner."""
    structure = _IN_PLANE_8 if step > 1 else _IN_PLANE_4
    out = np.empty_like(filled)
    for k in range(0, len(filled), SLAB):
        out[k : k + SLAB] = ndimage.binary_erosion(
            filled[k : k + SLAB], structure=structure, border_value=1
        )
    return out


def remove_thin_attachments(
    mask: np.ndarray, affine: np.ndarray, radius_mm: float = TABLE_RADIUS_MM
) -> np.ndarray:
    """Cut structures thinner than ``2 * radius_mm`` in the axial plane (the table, head
    holders, cables) where they touch the patient: an in-plane opening (erosion then dilation
    by a disk, as distance transforms) on the ~2 mm grid; the mask keeps its full resolution
    within the opening's reach. In place; returns ``mask``."""
    pixel_mm = float(min(np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 2])))
    step = grid_step(affine)
    block_mm = pixel_mm * step
    coarse = np.ascontiguousarray(mask[:, ::step, ::step])
    # each slice's transforms cover the mask's box and what the dilation can reach from it
    boxes = list(_boxes(coarse, margin=int(np.ceil(radius_mm / block_mm)) + 2))
    core = np.zeros(coarse.shape, dtype=bool)
    for k, box in boxes:
        distance = ndimage.distance_transform_edt(coarse[k][box], sampling=block_mm)
        core[k][box] = distance > radius_mm
    if not core.any():
        return mask
    core = largest_component(core)  # the patient's core; what the opening cut off stays off
    near = np.zeros(coarse.shape, dtype=bool)
    for k, box in boxes:
        if core[k][box].any():
            distance = ndimage.distance_transform_edt(~core[k][box], sampling=block_mm)
            near[k][box] = distance <= radius_mm + block_mm
    for k in range(0, len(mask), SLAB):
        combine(mask[k : k + SLAB], near[k : k + SLAB], step, np.logical_and)
    return mask


def _boxes(mask: np.ndarray, margin: int) -> Iterator[tuple[int, tuple[slice, slice]]]:
    """(slice, its box) of every slice of ``mask`` that has a True pixel: the rows and columns
    from its first to its last True pixel, ``margin`` more on each side within the image."""
    on_rows, on_columns = mask.any(axis=2), mask.any(axis=1)
    rows, columns = mask.shape[1:]
    for k in np.flatnonzero(on_rows.any(axis=1)):
        r, c = np.flatnonzero(on_rows[k]), np.flatnonzero(on_columns[k])
        yield (
            int(k),
            (
                slice(max(0, int(r[0]) - margin), min(rows, int(r[-1]) + 1 + margin)),
                slice(max(0, int(c[0]) - margin), min(columns, int(c[-1]) + 1 + margin)),
            ),
        )


def segment_lungs(
    hu: np.ndarray,
    affine: np.ndarray,
    body: np.ndarray | None = None,
    body_bits: np.ndarray | None = None,
    out: np.ndarray | None = None,
    out_bits: np.ndarray | None = None,
) -> np.ndarray:
    """ct-lungs: air regions inside the body of at least MIN_LUNG_ML, split left/right.

    The split is the body's sagittal midline in patient coordinates (LPS: +x is the patient's
    left). Returns uint8 labels (0 background, 1 right lung, 2 left lung); empty for a study
    without lungs (a head CT), which is a result, not an error. ``body``: ct-body's mask of
    this volume (0/1) when the caller has it, so that it is not computed a second time;
    ``body_bits`` the same packed along each row (numpy ``packbits``), unpacked a slab at a
    time.

    The air's components are found on the ~2 mm grid (a block is air if most of its pixels
    are); a lung's pixels are the air pixels of its blocks and of the part-air blocks beside
    them. ``out``: a uint8 array of the volume's shape to write the labels into; or
    ``out_bits``, a uint8 array of (2, slices, rows, ceil(columns / 8)) that gets each lung's
    mask packed along the rows instead (index 0 the right lung, 1 the left: label value - 1),
    returned in place of the labels: no label volume is made.
    """
    if out is not None and (out.shape != hu.shape or out.dtype != np.uint8):
        raise ValueError(f"an output of {out.shape} {out.dtype} for a {hu.shape} volume")
    packed = (2, *hu.shape[:2], -(-hu.shape[2] // 8))
    if out_bits is not None and (out_bits.shape != packed or out_bits.dtype != np.uint8):
        raise ValueError(
            f"a packed output of {out_bits.shape} {out_bits.dtype} for a {hu.shape} volume "
            f"(expected {packed} uint8)"
        )
    if out is not None and out_bits is not None:
        raise ValueError("labels or bits, not both")
    body_slab = _body_slabs(hu, affine, body, body_bits)
    result: np.ndarray
    if out_bits is not None:
        out_bits[...] = 0
        result = out_bits
    elif out is None:
        result = out = np.zeros(hu.shape, dtype=np.uint8)
    else:
        out[...] = 0
        result = out
    midline = _mean_x(body_slab, hu.shape, affine)
    if midline is None:  # no body
        return result
    step = grid_step(affine)
    air_count: np.ndarray = np.empty(grid_shape(hu.shape, step), dtype=count_type(step))
    for k in range(0, len(hu), SLAB):
        air = hu[k : k + SLAB] < AIR_THRESHOLD_HU
        air &= body_slab(k)
        air_count[k : k + SLAB] = block_counts(air, step)
    found = _components(air_count > block_area(hu.shape, step) // 2)  # mostly air
    if found.count == 0:
        return result
    # only the components large enough to be a lung are numbered (a CT's air holds tens of
    # thousands of small pockets): their labels fit in uint16 and replace the slabs' own
    all_sizes = found.sizes(weights=air_count)  # air pixels, not blocks
    big = np.flatnonzero(all_sizes * voxel_ml(affine) >= MIN_LUNG_ML)
    big = big[big > 0]
    if big.size == 0:
        return result
    renumber = np.zeros(found.count + 1, dtype=np.uint16)
    renumber[big] = np.arange(1, big.size + 1)
    labels, count = found.relabel(renumber), int(big.size)
    del found
    sizes = np.concatenate([[0], all_sizes[big]])
    # Air enclosed by a closed ring of bone in its slices is intracranial (a skull), not lung:
    # ribs, spine and sternum do not close a ring around the lungs in an axial slice.
    enclosed = np.zeros(count + 1, dtype=np.int64)
    for k in range(0, len(hu), SLAB):
        ring = _inside_bone_ring(hu[k : k + SLAB], step)
        weight = air_count[k : k + SLAB][ring]
        enclosed += np.bincount(
            labels[k : k + SLAB][ring], weights=weight, minlength=count + 1
        ).astype(np.int64)
    lung_like = (sizes * voxel_ml(affine) >= MIN_LUNG_ML) & (
        enclosed < MAX_ENCLOSED_FRACTION * sizes
    )
    lung_like[0] = False
    if not lung_like.any():
        return result
    lung = lung_like[labels]  # a lookup per block (np.isin sorts: much slower)
    del labels
    if step > 1:  # the lungs' edges: the part-air blocks beside their blocks
        lung |= (air_count > 0) & ndimage.binary_dilation(lung, structure=_IN_PLANE_8)
    for k in range(0, len(hu), SLAB):
        if not lung[k : k + SLAB].any():
            continue
        keep = hu[k : k + SLAB] < AIR_THRESHOLD_HU
        keep &= body_slab(k)
        combine(keep, lung[k : k + SLAB], step, np.logical_and)
        left = keep & (_patient_x(affine, keep.shape, first=k) >= midline)
        if out_bits is not None:
            out_bits[RIGHT_LUNG - 1, k : k + SLAB] = np.packbits(keep & ~left, axis=-1)
            out_bits[LEFT_LUNG - 1, k : k + SLAB] = np.packbits(left, axis=-1)
            continue
        assert out is not None
        slab = out[k : k + SLAB]
        slab[keep] = RIGHT_LUNG
        slab[left] = LEFT_LUNG
    return result


def _inside_bone_ring(hu: np.ndarray, step: int) -> np.ndarray:
    """The blocks enclosed by bone (a block with a pixel over BONE_THRESHOLD_HU) within their
    axial slice."""
    bone = block_counts(hu > BONE_THRESHOLD_HU, step) > 0
    return fill_holes_per_slice(bone) & ~bone


def _patient_x(affine: np.ndarray, shape: tuple[int, ...], first: int = 0) -> np.ndarray:
    """Patient x (LPS) of every voxel of a block of ``shape`` starting at slice ``first``."""
    k = np.arange(first, first + shape[0], dtype=np.float32)[:, None, None] * np.float32(
        affine[0, 0]
    )
    j = np.arange(shape[1], dtype=np.float32)[None, :, None] * np.float32(affine[0, 1])
    i = np.arange(shape[2], dtype=np.float32)[None, None, :] * np.float32(affine[0, 2])
    return k + j + i + np.float32(affine[0, 3])


def _body_slabs(
    hu: np.ndarray, affine: np.ndarray, body: np.ndarray | None, bits: np.ndarray | None
) -> Callable[[int], np.ndarray]:
    """slice index -> the body mask (bool) of the SLAB slices from there, from a mask given as
    bytes, as bits, or computed here."""
    if bits is not None:
        packed = (*hu.shape[:2], -(-hu.shape[2] // 8))
        if bits.shape != packed or bits.dtype != np.uint8:
            raise ValueError(
                f"a packed body mask of {bits.shape} {bits.dtype} for a {hu.shape} volume "
                f"(expected {packed} uint8)"
            )
        columns = hu.shape[2]
        return lambda k: np.unpackbits(bits[k : k + SLAB], axis=-1, count=columns).view(bool)
    if body is None:
        body = segment_body(hu, affine)
    elif body.shape != hu.shape or body.dtype.itemsize != 1:
        raise ValueError(f"a body mask of {body.shape} {body.dtype} for a {hu.shape} volume")
    mask = body.view(bool)
    return lambda k: mask[k : k + SLAB]


def _mean_x(
    body_slab: Callable[[int], np.ndarray], shape: tuple[int, ...], affine: np.ndarray
) -> float | None:
    """The mean patient x of a mask's voxels (None if it has none), from its counts along
    each axis, slab by slab (never the voxels' index arrays: three int64 copies of a
    half-full 1,000-slice mask are 3 GB)."""
    per_slice = np.zeros(shape[0], dtype=np.int64)
    per_row = np.zeros(shape[1], dtype=np.int64)
    per_column = np.zeros(shape[2], dtype=np.int64)
    for k in range(0, shape[0], SLAB):
        part = body_slab(k)
        per_slice[k : k + len(part)] = part.sum(axis=(1, 2), dtype=np.int64)
        per_row += part.sum(axis=(0, 2), dtype=np.int64)
        per_column += part.sum(axis=(0, 1), dtype=np.int64)
    total = float(per_slice.sum())
    if total == 0:
        return None
    mk, mj, mi = (
        float(np.dot(np.arange(len(c)), c)) / total for c in (per_slice, per_row, per_column)
    )
    return float(affine[0, 0] * mk + affine[0, 1] * mj + affine[0, 2] * mi + affine[0, 3])
