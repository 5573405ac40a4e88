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
fill here is exact and costs time in proportion to the shape's height times its
vertex count, inside the shape's bounding box only.

It also owns the geometric checks made before filling: degenerate rings (no
area) and rings leaving the tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Exports store float coordinates; a vertex at -1e-9 is rounding noise, not a shape leaving the tile.
_BOUNDS_TOLERANCE = 1e-6


def _scanline_crossings(
    ring: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where the ring's edges cross the centre line of each pixel row in ``rows``.

    Returns (row, column) pairs where the column is the first pixel whose centre
    is at or right of the crossing, clipped to ``cols`` (a crossing left of the
    window still flips the parity of every pixel in it, so it lands on column 0).
    """
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Half-open in y (lower end in, upper end out) so a vertex shared by two edges counts once
    # and horizontal edges count never: rows whose centre r + 0.5 lies in [min(y), max(y)).
    first = np.maximum(np.ceil(np.minimum(y0, y1) - 0.5), rows[0]).astype(np.int64)
    stop = np.minimum(np.ceil(np.maximum(y0, y1) - 0.5), rows[1]).astype(np.int64)
    counts = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(counts)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    row = np.repeat(first, counts) + offset
    t = (row + 0.5 - y0[edge]) / (y1[edge] - y0[edge])  # never 0/0: flat edges have no rows
    x = x0[edge] + t * (x1[edge] - x0[edge])
    col = np.clip(np.ceil(x - 0.5), cols[0], cols[1]).astype(np.int64)
    return row, col


def rasterise(rings: Sequence[np.ndarray], width: int, height: int) -> tuple[int, int, np.ndarray] | None:
    """Even-odd fill of ``rings``: ``(row0, col0, inside)`` for the shape's window, None if empty.

    A pixel is inside when an odd number of edge crossings lie at or left of its
    centre on its row; parities are a running XOR of toggles along each row.
    """
    points = np.concatenate(rings)
    row0 = max(math.ceil(points[:, 1].min() - 0.5), 0)
    row1 = min(math.ceil(points[:, 1].max() - 0.5), height)
    col0 = max(math.ceil(points[:, 0].min() - 0.5), 0)
    col1 = min(math.ceil(points[:, 0].max() - 0.5), width)
    if row1 <= row0 or col1 <= col0:
        return None
    crossings = [_scanline_crossings(ring, (row0, row1), (col0, col1)) for ring in rings]
    rows = np.concatenate([r for r, _ in crossings]) - row0
    cols = np.concatenate([c for _, c in crossings]) - col0
    span = col1 - col0 + 1  # one spare column takes crossings right of the window
    toggles = np.bincount(rows * span + cols, minlength=(row1 - row0) * span).reshape(row1 - row0, span)
    inside = (np.cumsum(toggles, axis=1) & 1).astype(bool)[:, :-1]
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
