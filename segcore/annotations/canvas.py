"""Painting parsed vector annotations onto one tile's class-index mask.

This module owns the format-neutral middle of vector rendering: each format
(``geojson``, ``coco``, ``labeller``) turns its file into ``Shape`` values (a
class as the file writes it, plus rings from ``to_ring`` or a bitmap), and a
``Canvas`` resolves the class, checks the geometry and fills the pixels with
``raster.rasterise``.

Overlap policy: shapes are painted in file order and a later shape overwrites
an earlier one (Django-Labeller's own renderer does the same); when shapes of
two different classes overlap, one OVERLAP warning per tile says so. Separate
pieces of one shape are united; the rings of one piece are combined by the
even-odd rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segcore import limits
from segcore.annotations.issues import ERROR, WARNING, Notes, Rendered, Skip, finish
from segcore.annotations.raster import degenerate, outside, rasterise, row_crossings


def to_ring(pairs: Iterable[Any]) -> np.ndarray:
    """An ``N x 2`` float array of (x, y); extra values per point (GeoJSON z) are ignored.
    Refuses a ring over the vertex limit (reading no further) or with coordinates beyond it."""
    most = limits.MAX_VERTICES_PER_SHAPE
    try:
        ring = np.array([(float(p[0]), float(p[1])) for p in itertools.islice(pairs, most + 1)],
                        dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise Skip(ERROR, "BAD_FORMAT", f"coordinates are not (x, y) numbers ({exc})") from exc
    if len(ring) > most:
        raise Skip(ERROR, "TOO_COMPLEX", f"has more than {most:,} vertices in one ring; simplify it")
    if not np.isfinite(ring).all():
        raise Skip(ERROR, "BAD_FORMAT", "coordinates contain NaN or infinity")
    if len(ring) and np.abs(ring).max() > limits.MAX_COORDINATE:
        raise Skip(ERROR, "BAD_FORMAT", f"coordinates lie beyond ±{limits.MAX_COORDINATE:,.0f} pixels")
    return ring


@dataclass
class Shape:
    """One annotation ready to paint: its class as written in the file and its geometry."""

    where: str
    label: object
    # Each piece is a list of rings combined by the even-odd rule; pieces are united.
    pieces: list[list[np.ndarray]] = field(default_factory=list)
    # True: ring 0 of a piece is its outline, later rings are holes (GeoJSON, COCO), so a
    # degenerate outline drops the piece. False: all rings are equal partners (Django-Labeller).
    outline_first: bool = True
    bitmap: np.ndarray | None = None  # COCO RLE, already the tile's size


class Canvas:
    """Paints shapes in file order onto one tile's mask, noting what goes wrong."""

    def __init__(self, width: int, height: int, classes: Mapping[str, int], notes: Notes) -> None:
        self.width, self.height = width, height
        self.classes = classes
        self.names = list(classes)
        self.notes = notes
        self.mask = np.zeros((height, width), np.uint8)
        # Which pixels some shape has claimed: background (0) painted on purpose still
        # counts, so an overlap with an explicit background shape is reported too.
        self._painted = np.zeros((height, width), bool)
        self._overlap_noted = False
        # What filling may still cost on this tile (segcore.limits), over all its shapes.
        self._vertices_left = limits.MAX_VERTICES_PER_TILE
        self._crossings_left = limits.MAX_ROW_CROSSINGS_PER_PIXEL * width * height

    def paint(self, shape: Shape) -> None:
        index = self._resolve(shape.label, shape.where)
        if index is None or not self._affordable(shape):
            return
        if shape.bitmap is not None:
            self._fill(0, 0, shape.bitmap, index, shape.where)
        if any(outside(ring, self.width, self.height) for piece in shape.pieces for ring in piece):
            detail = f"extends outside the {self.width}x{self.height} tile; clipped to it"
            self.notes.add(WARNING, "OUT_OF_BOUNDS", detail, shape.where)
        for j, piece in enumerate(shape.pieces):
            where = shape.where if len(shape.pieces) == 1 else f"{shape.where} polygon {j}"
            rings = self._usable(piece, where, shape.outline_first)
            window = rasterise(rings, self.width, self.height) if rings else None
            if window is not None:
                self._fill(*window, index, shape.where)

    def _affordable(self, shape: Shape) -> bool:
        """Whether the shape fits what is left of the tile's budgets; if so, they pay for it."""
        rings = [ring for piece in shape.pieces for ring in piece]
        vertices = sum(len(ring) for ring in rings)
        if vertices > limits.MAX_VERTICES_PER_SHAPE:
            detail = f"has {vertices:,} vertices; at most {limits.MAX_VERTICES_PER_SHAPE:,} per shape: simplify it"
            self.notes.add(ERROR, "TOO_COMPLEX", detail, shape.where)
            return False
        if vertices > self._vertices_left:
            detail = f"the tile's shapes have more than {limits.MAX_VERTICES_PER_TILE:,} vertices: simplify them"
            self.notes.add(ERROR, "TOO_COMPLEX", detail, shape.where)
            return False
        crossings = sum(row_crossings(piece, self.width, self.height) for piece in shape.pieces if piece)
        if crossings > self._crossings_left:
            detail = (f"filling the tile's shapes would cross more than {limits.MAX_ROW_CROSSINGS_PER_PIXEL} "
                      "pixel rows per pixel (edges zig-zagging across the tile?): simplify them")
            self.notes.add(ERROR, "TOO_COMPLEX", detail, shape.where)
            return False
        self._vertices_left -= vertices
        self._crossings_left -= crossings
        return True

    def _resolve(self, label: object, where: str) -> int | None:
        if label is None or (isinstance(label, str) and not label.strip()):
            self.notes.add(WARNING, "UNCLASSIFIED", "no class; skipped", where)
            return None
        if not isinstance(label, str):
            self.notes.add(ERROR, "BAD_FORMAT", f"class must be a name, got {label!r}", where)
            return None
        index = self.classes.get(label)
        if index is None:
            detail = f"class {label!r} is not one of the training classes ({', '.join(self.names)})"
            self.notes.add(ERROR, "UNKNOWN_CLASS", detail, where)
        return index

    def _usable(self, piece: list[np.ndarray], where: str, outline_first: bool) -> list[np.ndarray]:
        detail = "fewer than 3 distinct points or zero area; skipped"
        if not piece:
            self.notes.add(WARNING, "DEGENERATE_POLYGON", detail, where)
            return []
        kept = []
        for k, ring in enumerate(piece):
            if not degenerate(ring):
                kept.append(ring)
                continue
            self.notes.add(WARNING, "DEGENERATE_POLYGON", detail, where if len(piece) == 1 else f"{where} ring {k}")
            if k == 0 and outline_first:
                return []  # its holes alone would be filled by the even-odd rule
        return kept

    def _fill(self, row0: int, col0: int, inside: np.ndarray, index: int, where: str) -> None:
        window = (slice(row0, row0 + inside.shape[0]), slice(col0, col0 + inside.shape[1]))
        mask, painted = self.mask[window], self._painted[window]  # views: writes land in the tile
        clash = inside & painted & (mask != index)
        if not self._overlap_noted and clash.any():
            earlier = self.names[int(mask[clash][0])]
            detail = (
                f"overlaps an earlier annotation of class {earlier!r}; later annotations overwrite "
                "earlier ones (reported once per tile)"
            )
            self.notes.add(WARNING, "OVERLAP", detail, where)
            self._overlap_noted = True
        mask[inside] = index
        painted |= inside


def paint_all(shapes: Iterable[Shape], canvas: Canvas) -> Rendered:
    """Paint ``shapes`` in order and finish the tile (adding NO_ANNOTATIONS when it is empty)."""
    for shape in shapes:
        canvas.paint(shape)
    return finish(canvas.mask, canvas.notes)
