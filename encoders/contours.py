"""Closed boundaries of a binary mask, slice by slice: marching squares in array operations.

The same contours as scikit-image's ``find_contours(mask, 0.5)`` on each slice padded by one
pixel (tests compare the two): every vertex is the midpoint of a pixel edge between inside and
outside, ambiguous diagonal cells keep the outside connected (``fully_connected="low"``), and
every contour runs the way scikit-image's does. scikit-image joins the segments in Python, one
dictionary operation at a time (most of an RTSTRUCT's time on a large CT); here the segments
of a whole slab of slices are found at once, linked by sorting, and the cycles they form put
in order by pointer jumping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Edges of a cell as offsets, in doubled pixel coordinates, from its top-left pixel: a vertex
# at (2r + dr, 2c + dc) / 2 lies midway along that edge.
_TOP, _BOTTOM, _LEFT, _RIGHT = (0, 1), (2, 1), (1, 0), (1, 2)
# Segments (from edge, to edge) per cell case: bit 0 top-left inside, 1 top-right,
# 2 bottom-left, 3 bottom-right (scikit-image's table, outside vertices connected)
_CASES: dict[int, tuple[tuple[tuple[int, int], tuple[int, int]], ...]] = {
    1: ((_TOP, _LEFT),),
    2: ((_RIGHT, _TOP),),
    3: ((_RIGHT, _LEFT),),
    4: ((_LEFT, _BOTTOM),),
    5: ((_TOP, _BOTTOM),),
    6: ((_RIGHT, _TOP), (_LEFT, _BOTTOM)),
    7: ((_RIGHT, _BOTTOM),),
    8: ((_BOTTOM, _RIGHT),),
    9: ((_TOP, _LEFT), (_BOTTOM, _RIGHT)),
    10: ((_BOTTOM, _TOP),),
    11: ((_BOTTOM, _LEFT),),
    12: ((_LEFT, _RIGHT),),
    13: ((_TOP, _RIGHT),),
    14: ((_LEFT, _TOP),),
}
# lookup tables: [slot, case] -> offsets; slot 1 only for the two saddle cases
_FROM = np.zeros((2, 16, 2), dtype=np.int64)
_TO = np.zeros((2, 16, 2), dtype=np.int64)
for _case, _segments in _CASES.items():
    for _slot, (_a, _b) in enumerate(_segments):
        _FROM[_slot, _case], _TO[_slot, _case] = _a, _b
SLAB = 16  # slices traced at once (bounds the working arrays on a large CT)


@dataclass(frozen=True)
class Contours:
    """Every closed boundary of a mask: contour n lies on slice ``slices[n]`` and its points
    (row, column; pixel centres at integers) are ``points[starts[n]:starts[n + 1]]``."""

    slices: np.ndarray
    starts: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    def contour(self, n: int) -> np.ndarray:
        """The points of contour ``n``, (N, 2) row and column."""
        return self.points[self.starts[n] : self.starts[n + 1]]


def trace(mask: np.ndarray) -> Contours:
    """The closed boundaries of each slice of a 3D boolean mask, in slice order, with points
    where the polygon goes straight on removed (the shape is unchanged)."""
    mask = np.asarray(mask, dtype=bool)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    occupied = np.flatnonzero(mask.any(axis=(1, 2)))
    for s in range(0, len(occupied), SLAB):
        ks = occupied[s : s + SLAB]
        parts.append(_trace_slab(mask, ks))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Contours(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 2)))
    slices = np.concatenate([p[0] for p in parts])
    sizes = np.concatenate([np.diff(p[1]) for p in parts])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    points = np.concatenate([p[2] for p in parts])
    return Contours(slices, starts, points)


def _trace_slab(mask: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sub = mask[ks[0] : ks[-1] + 1]
    rows = np.flatnonzero(sub.any(axis=(0, 2)))
    cols = np.flatnonzero(sub.any(axis=(0, 1)))
    r0, c0 = int(rows[0]), int(cols[0])
    box = np.pad(sub[:, r0 : rows[-1] + 1, c0 : cols[-1] + 1], ((0, 0), (1, 1), (1, 1)))
    box = box.view(np.uint8)
    case = box[:, :-1, :-1] | (box[:, :-1, 1:] << 1) | (box[:, 1:, :-1] << 2)
    case |= box[:, 1:, 1:] << 3
    cells = np.flatnonzero((case != 0) & (case != 15))
    kk, rr, cc = np.unravel_index(cells, case.shape)
    cases = case.ravel()[cells]
    saddle = (cases == 6) | (cases == 9)
    height, width = 2 * box.shape[1] + 1, 2 * box.shape[2] + 1

    def keys(table: np.ndarray, slot: int, pick: np.ndarray | slice) -> np.ndarray:
        offsets = table[slot, cases[pick]]
        r = 2 * rr[pick] + offsets[:, 0]
        c = 2 * cc[pick] + offsets[:, 1]
        return (kk[pick].astype(np.int64) * height + r) * width + c

    start = np.concatenate([keys(_FROM, 0, slice(None)), keys(_FROM, 1, saddle)])
    end = np.concatenate([keys(_TO, 0, slice(None)), keys(_TO, 1, saddle)])
    order = np.argsort(start, kind="stable")
    following = order[np.searchsorted(start, end, sorter=order)]
    path, bounds = _cycles(following)
    # contours in slice order (a cycle of saddle cells' second segments only comes last)
    first_k = start[path[bounds[:-1]]] // (width * height)
    if np.any(np.diff(first_k) < 0):
        cycles = np.argsort(first_k, kind="stable")
        path = np.concatenate([path[bounds[n] : bounds[n + 1]] for n in cycles])
        bounds = np.concatenate([[0], np.cumsum(np.diff(bounds)[cycles])]).astype(np.int64)
    key = start[path]
    r2 = (key // width) % height
    c2 = key % width
    k_local = key // (width * height)
    # drop points where the polygon goes straight on (exact: doubled integer coordinates)
    n = len(path)
    index = np.arange(n)
    owner = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    first_of = bounds[:-1][owner]
    last_of = bounds[1:][owner] - 1
    prev = np.where(index == first_of, last_of, index - 1)
    after = np.where(index == last_of, first_of, index + 1)
    cross = (r2 - r2[prev]) * (c2[after] - c2) - (c2 - c2[prev]) * (r2[after] - r2)
    keep = cross != 0
    kept = np.add.reduceat(keep.astype(np.int64), bounds[:-1])
    keep |= (kept < 3)[owner]  # a polygon that would lose its area keeps every point
    sizes = np.add.reduceat(keep.astype(np.int64), bounds[:-1])
    points = np.column_stack([r2[keep] / 2.0 + (r0 - 1), c2[keep] / 2.0 + (c0 - 1)])
    slices = ks[0] + k_local[bounds[:-1]]
    return slices.astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]), points


def _cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cycles of the permutation ``nxt`` (every vertex of a padded binary image begins
    one segment and ends another, so the segments form disjoint cycles): the segments cycle
    by cycle, each cycle from its smallest index on and cycles ordered by it, and where each
    cycle begins. Pointer jumping: a logarithmic number of array steps instead of a Python
    step per segment."""
    n = len(nxt)
    index = np.arange(n)
    # each cycle's smallest index: the minimum over a window that doubles until it is the
    # same all along every cycle (then it is the cycle's minimum)
    label, jump = index.copy(), nxt.copy()
    while not np.array_equal(label, label[nxt]):
        label = np.minimum(label, label[jump])
        jump = jump[jump]
    head = label == index
    # distance from the head along the cycle (list ranking, back along the predecessors)
    back = np.empty_like(nxt)
    back[nxt] = index
    back[head] = index[head]
    distance = (~head).astype(np.int64)
    while np.any(back != back[back]):
        distance += distance[back]
        back = back[back]
    order = np.lexsort((distance, label))
    sizes = np.bincount(label, minlength=n)[index[head]]
    return order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
