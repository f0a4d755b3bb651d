"""A coarse in-plane grid of pixel blocks, on which the classic models decide connectivity.

Labelling, hole filling and distance transforms cost per voxel: a 1,000-slice 512x512 CT has
262 M of them. The models decide what is connected to what on blocks of about ``GRID_MM``
(a 0.45 mm head CT: 4x4 pixels, 16 times fewer voxels; slices are never merged) and draw the
boundary at full resolution: the blocks say where, the pixels say exactly.
"""

from __future__ import annotations

import numpy as np

GRID_MM = 2.0  # in-plane side of a block, about


def grid_step(affine: np.ndarray) -> int:
    """Pixels per block side for ``affine``'s pixel spacing: 1 (the full resolution) for
    pixels of 1.33 mm or more."""
    pixel_mm = float(min(np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 2])))
    return max(1, round(GRID_MM / max(pixel_mm, 1e-3)))


def grid_shape(shape: tuple[int, ...], step: int) -> tuple[int, int, int]:
    """(slices, block rows, block columns) of a volume of ``shape``; the last blocks of a
    row or column may be partial."""
    return shape[0], -(-shape[1] // step), -(-shape[2] // step)


def count_type(step: int) -> type[np.unsignedinteger]:
    """The integer type of :func:`block_counts` for blocks of ``step`` pixels a side."""
    return np.uint8 if step * step < 256 else np.uint16


def block_counts(mask: np.ndarray, step: int) -> np.ndarray:
    """The True pixels of every ``step`` x ``step`` block of each slice of ``mask`` (uint8 up
    to 15-pixel blocks, uint16 beyond)."""
    dtype = count_type(step)
    slices, rows, columns = grid_shape(mask.shape, step)
    across: np.ndarray = np.zeros((slices, mask.shape[1], columns), dtype)
    for i in range(step):  # strided sums: much faster than a reduction over reshaped axes
        part = mask[:, :, i::step]
        across[:, :, : part.shape[2]] += part
    if step == 1:
        return across
    out: np.ndarray = np.zeros((slices, rows, columns), dtype)
    for j in range(step):
        part = across[:, j::step]
        out[:, : part.shape[1]] += part
    return out


def block_area(shape: tuple[int, ...], step: int) -> np.ndarray:
    """Pixels in each block of one slice (rows, columns): ``step`` squared but at the edges."""
    rows = np.minimum(step, shape[1] - step * np.arange(grid_shape(shape, step)[1]))
    columns = np.minimum(step, shape[2] - step * np.arange(grid_shape(shape, step)[2]))
    return np.outer(rows, columns)


def combine(full: np.ndarray, blocks: np.ndarray, step: int, op: np.ufunc) -> np.ndarray:
    """``full = op(full, expand(blocks))`` in place, with ``op`` a binary ufunc (such as
    ``np.logical_and``); returns ``full``. The blocks are repeated along the columns only
    (a ``step``-th of the slab) and broadcast along the rows."""
    if step == 1:
        return op(full, blocks, out=full)
    slices, rows, columns = full.shape
    wide = np.repeat(blocks, step, axis=2)[:, :, :columns]  # (slices, block rows, columns)
    whole = rows // step
    if whole:
        view = full[:, : whole * step].reshape(slices, whole, step, columns)
        op(view, wide[:, :whole, None, :], out=view)
    if rows > whole * step:  # the last, partial block row
        rest = full[:, whole * step :]
        op(rest, wide[:, whole:, :], out=rest)
    return full
