"""Exact polygon rasterisation: which pixels a set of vector rings covers.

This module owns the pixel convention every vector format (GeoJSON, COCO
polygons, Django-Labeller) is rendered with. Coordinates are continuous pixel
units, x right, y down, with pixel (col, row) covering
``[col, col+1) x [row, row+1)`` (what QuPath, COCO and Django-Labeller's SVG
canvas use). A pixel belongs to a shape when its centre
``(col + 0.5, row + 0.5)`` is inside; a centre exactly on an edge counts for the
left/top edge and not for the right/bottom one, so shapes that share an edge
never both claim a pixel and a square from 2 to 6 covers exactly pixels 2..5.
Rings are combined with the even-odd rule (a GeoJSON hole or a nested
Django-Labeller region is cut out).

Pillow's ``ImageDraw.polygon`` is deliberately not used: it truncates vertex
coordinates toward zero and fills boundary pixels too, so that square would
come out 5 pixels wide and a vertex at 4.99 would act as 4. The numpy scanline
fill here is exact and costs time in proportion to the pixel rows its edges cross
(``row_crossings``, which a caller can bound before filling), inside the shape's
bounding box only.

It also owns the geometric checks made before filling: degenerate rings (no
area) and rings leaving the tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

# Exports store float coordinates; a vertex at -1e-9 is rounding noise, not a shape leaving the tile.
_BOUNDS_TOLERANCE = 1e-6
_CHUNK = 1 << 20  # crossings computed at once


def _edge_rows(ring: np.ndarray, rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each edge of the ring, the first pixel row (within ``rows``) whose centre line it
    crosses and how many rows it crosses. Half-open in y (lower end in, upper end out) so a
    vertex shared by two edges counts once and horizontal edges count never: rows whose centre
    r + 0.5 lies in [min(y), max(y))."""
    y0, y1 = ring[:, 1], np.roll(ring[:, 1], -1)
    first = np.maximum(np.ceil(np.minimum(y0, y1) - 0.5), rows[0]).astype(np.int64)
    stop = np.minimum(np.ceil(np.maximum(y0, y1) - 0.5), rows[1]).astype(np.int64)
    return first, np.maximum(stop - first, 0)


def _scanline_crossings(ring: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Where the ring's edges cross the centre line of each pixel row in ``rows``, in chunks of
    about ``_CHUNK`` crossings (so memory does not grow with the shape's complexity).

    Yields (row, column) pairs where the column is the first pixel whose centre is at or right
    of the crossing, clipped to ``cols`` (a crossing left of the window still flips the parity
    of every pixel in it, so it lands on column 0).
    """
    first, counts = _edge_rows(ring, rows)
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts) and ends[-1] > (ends[start - 1] if start else 0):
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + _CHUNK, side="right")))
        yield _crossings(ring, first, counts, start, stop, cols)
        start = stop


def _crossings(ring: np.ndarray, first: np.ndarray, counts: np.ndarray, start: int, stop: int,
               cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The crossings of edges ``start:stop``."""
    n = counts[start:stop]
    edge = start + np.repeat(np.arange(len(n)), n)
    offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    row = first[edge] + offset
    x0, y0 = ring[edge, 0], ring[edge, 1]
    following = (edge + 1) % len(ring)
    x1, y1 = ring[following, 0], ring[following, 1]
    t = (row + 0.5 - y0) / (y1 - y0)  # never 0/0: flat edges have no rows
    x = x0 + t * (x1 - x0)
    col = np.clip(np.ceil(x - 0.5), cols[0], cols[1]).astype(np.int64)
    return row, col


def row_crossings(rings: Sequence[np.ndarray], width: int, height: int) -> int:
    """How many (edge, pixel row) crossings filling ``rings`` on the tile costs: what
    ``rasterise`` spends time and memory on, known before it starts."""
    window = _window(rings, width, height)
    if window is None:
        return 0
    return sum(int(_edge_rows(ring, (window[0], window[1]))[1].sum()) for ring in rings)


def _window(rings: Sequence[np.ndarray], width: int, height: int) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1) of the pixels the rings' bounding box covers on the tile."""
    points = np.concatenate(rings) if len(rings) else np.empty((0, 2))
    if not len(points):
        return None
    row0 = max(math.ceil(points[:, 1].min() - 0.5), 0)
    row1 = min(math.ceil(points[:, 1].max() - 0.5), height)
    col0 = max(math.ceil(points[:, 0].min() - 0.5), 0)
    col1 = min(math.ceil(points[:, 0].max() - 0.5), width)
    if row1 <= row0 or col1 <= col0:
        return None
    return row0, row1, col0, col1


def rasterise(rings: Sequence[np.ndarray], width: int, height: int) -> tuple[int, int, np.ndarray] | None:
    """Even-odd fill of ``rings``: ``(row0, col0, inside)`` for the shape's window, None if empty.

    A pixel is inside when an odd number of edge crossings lie at or left of its
    centre on its row; parities are a running XOR of toggles along each row. Memory: the
    window, plus one chunk of crossings at a time.
    """
    window = _window(rings, width, height)
    if window is None:
        return None
    row0, row1, col0, col1 = window
    span = col1 - col0 + 1  # one spare column takes crossings right of the window
    toggles = np.zeros((row1 - row0) * span, np.int64)
    for ring in rings:
        for rows, cols in _scanline_crossings(ring, (row0, row1), (col0, col1)):
            toggles += np.bincount((rows - row0) * span + (cols - col0), minlength=len(toggles))
    inside = (np.cumsum(toggles.reshape(row1 - row0, span), axis=1) & 1).astype(bool)[:, :-1]
    return (row0, col0, inside) if inside.any() else None


def degenerate(ring: np.ndarray) -> bool:
    """Fewer than 3 distinct points, or all points on one line (zero area)."""
    if len(np.unique(ring, axis=0)) < 3:
        return True
    # Collinearity rather than the shoelace area: a self-crossing "bow tie" has signed
    # area 0 yet covers pixels under the even-odd rule.
    d = ring - ring[0]
    v = d[np.argmax(np.abs(d).sum(axis=1))]
    cross = d[:, 0] * v[1] - d[:, 1] * v[0]
    return bool(np.abs(cross).max() <= 1e-9 * max(1.0, float(np.abs(d).max()) ** 2))


def outside(ring: np.ndarray, width: int, height: int) -> bool:
    """Whether any vertex lies off the ``width`` x ``height`` tile (beyond rounding noise)."""
    x, y = ring[:, 0], ring[:, 1]
    low, tol = -_BOUNDS_TOLERANCE, _BOUNDS_TOLERANCE
    return bool((x < low).any() or (y < low).any() or (x > width + tol).any() or (y > height + tol).any())
