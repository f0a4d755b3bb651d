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
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

from encoders.common import Box, bounding_box, in_threads

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
# lookup tables: [slot, case] -> the edge (0 top, 1 bottom, 2 left, 3 right) a segment starts
# and ends on; slot 1 only for the two saddle cases
_EDGES = (_TOP, _BOTTOM, _LEFT, _RIGHT)
_EDGE_OFFSET = np.array(_EDGES, dtype=np.int64)
_OPPOSITE = np.array([1, 0, 3, 2])  # the edge a neighbour shares, seen from the neighbour
_FROM_EDGE = np.zeros((2, 16), dtype=np.intp)
_TO_EDGE = np.zeros((2, 16), dtype=np.intp)
for _case, _segments in _CASES.items():
    for _slot, (_a, _b) in enumerate(_segments):
        _FROM_EDGE[_slot, _case], _TO_EDGE[_slot, _case] = _EDGES.index(_a), _EDGES.index(_b)
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


def trace(mask: np.ndarray, box: Box | None = None) -> Contours:
    """The closed boundaries of each slice of a 3D boolean mask, in slice order, with points
    where the polygon goes straight on removed (the shape is unchanged). ``box``, the mask's
    bounding box if the caller has it, spares finding it again."""
    mask = np.asarray(mask, dtype=bool)
    box = box if box is not None else bounding_box(mask)
    empty = np.zeros(0, dtype=np.int64)
    if box is None:
        return Contours(empty, np.zeros(1, dtype=np.int64), np.zeros((0, 2)))
    sub = mask[box]
    occupied = np.flatnonzero(sub.any(axis=(1, 2)))
    slabs = [occupied[s : s + SLAB] for s in range(0, len(occupied), SLAB)]
    # the slabs on every core: their array passes let the interpreter go
    parts = in_threads(lambda ks: _trace_slab(sub, ks), slabs)
    slices = np.concatenate([p[0] for p in parts]) + box[0].start
    sizes = np.concatenate([np.diff(p[1]) for p in parts])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    points = np.concatenate([p[2] for p in parts])
    points += (box[1].start, box[2].start)
    return Contours(slices, starts, points)


def _trace_slab(mask: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sub = mask[ks[0] : ks[-1] + 1].view(np.uint8)
    plane = sub[0].copy()
    for other in sub[1:]:  # slice by slice: numpy's reduction along axis 0 of a view is slow
        plane |= other
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    (r0, r1), (c0, c1) = (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)
    box = np.zeros((sub.shape[0], r1 - r0 + 2, c1 - c0 + 2), dtype=np.uint8)
    box[:, 1:-1, 1:-1] = sub[:, r0:r1, c0:c1]
    # each cell's case: its four pixels as bits (a row's pairs first, then pairs of rows)
    pairs = np.left_shift(box[:, :, 1:], 1)
    pairs |= box[:, :, :-1]
    case = np.left_shift(pairs[:, 1:], 2)
    case |= pairs[:, :-1]
    flat = case.ravel()
    cells = np.flatnonzero(flat - np.uint8(1) < 14)  # neither all outside (0) nor inside (15)
    cases = flat[cells]
    saddles = np.flatnonzero((cases == 6) | (cases == 9))
    n_first = len(cells)
    # segment n: cell cells[n] (its first segment) for n < n_first, else the second segment
    # of saddle cell cells[saddles[n - n_first]]
    seg_cell = np.concatenate([cells, cells[saddles]])
    seg_case = np.concatenate([cases, cases[saddles]])
    seg_slot = np.repeat(np.array([0, 1], dtype=np.intp), [n_first, len(saddles)])
    from_edge = _FROM_EDGE[seg_slot, seg_case]
    to_edge = _TO_EDGE[seg_slot, seg_case]
    # the segment that follows runs in the cell across the edge this one ends on, starting on
    # that cell's opposite edge: its first segment, or its second where it is a saddle whose
    # first segment starts elsewhere
    width = case.shape[2]
    step = np.array([-width, width, -1, 1])  # top, bottom, left, right
    # (the boundary cells are sorted: found by search, not through a table of every cell,
    # 8 bytes per cell of the slab)
    candidate = np.searchsorted(cells, seg_cell + step[to_edge])
    second = np.zeros(n_first, dtype=np.intp)
    second[saddles] = n_first + np.arange(len(saddles))
    following = np.where(from_edge[candidate] == _OPPOSITE[to_edge], candidate, second[candidate])
    path, bounds = _cycles(following)
    k_cell, in_slice = np.divmod(seg_cell, case.shape[1] * width)
    r_cell, c_cell = np.divmod(in_slice, width)
    # contours in slice order (a cycle of saddle cells' second segments only comes last)
    first_k = k_cell[path[bounds[:-1]]]
    if np.any(np.diff(first_k) < 0):
        cycles = np.argsort(first_k, kind="stable")
        path = np.concatenate([path[bounds[n] : bounds[n + 1]] for n in cycles])
        bounds = np.concatenate([[0], np.cumsum(np.diff(bounds)[cycles])]).astype(np.int64)
    # each point: where its segment starts, in doubled pixel coordinates of the padded box
    edge = from_edge[path]
    r2 = 2 * r_cell[path] + _EDGE_OFFSET[edge, 0]
    c2 = 2 * c_cell[path] + _EDGE_OFFSET[edge, 1]
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
    slices = ks[0] + first_k
    return slices.astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]), points


def _cycles(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cycles of the permutation ``nxt`` (every vertex of a padded binary image begins
    one segment and ends another, so the segments form disjoint cycles): the segments cycle
    by cycle, each cycle from its smallest index on and cycles ordered by it, and where each
    cycle begins. Two passes in compiled code instead of a Python step per segment: the
    cycles are scipy's connected components; then each cycle's last segment is made to lead
    to the next cycle's head, which joins them into one path, and scipy's depth-first
    search walks it."""
    n = len(nxt)
    index = np.arange(n)
    step = csr_matrix((np.ones(n, dtype=np.int8), nxt, np.arange(n + 1)), shape=(n, n))
    count, label = connected_components(step, directed=True, connection="weak")
    heads = np.full(count, n, dtype=np.int64)
    np.minimum.at(heads, label, index)
    heads.sort()  # the cycles in the order they go out
    sizes = np.bincount(label, minlength=count)[label[heads]]
    previous = np.empty_like(nxt)
    previous[nxt] = index
    joined = nxt.copy()
    joined[previous[heads]] = np.append(heads[1:], -1)  # the last cycle's end leads nowhere
    leads = joined >= 0
    path = csr_matrix(
        (np.ones(n - 1, dtype=np.int8), joined[leads], np.concatenate([[0], np.cumsum(leads)])),
        shape=(n, n),
    )
    order = depth_first_order(path, int(heads[0]), directed=True, return_predecessors=False)
    return order.astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
