"""Rendering of exported annotations into class-index masks, with precise problem reports.

This module owns the annotation formats segtrain accepts and the rules that turn
them into training masks (``uint8`` ``H x W`` class indices, 0 = background,
255 = unlabelled):

* per-tile files (``render_tile``): ``masks`` (class-index PNG/TIFF),
  ``instance-masks`` (instance-label PNG/TIFF), ``geojson`` (QuPath export of one
  tile) and ``labeller`` (Django-Labeller per-image JSON);
* single files covering many tiles (``load_collection``): ``coco`` (COCO JSON,
  polygons and RLE) and ``geojson`` (features naming their tile in
  ``properties.image``/``tile``/``image_name``).

Problems come back as ``AnnotationIssue`` values naming the tile, never as log
lines: severity ``error`` means the training set must be refused, ``warning`` is
stored with it. Only bytes that cannot be decoded at all (corrupt image, invalid
JSON, wrong top-level structure) raise ``InvalidTileError`` (per tile) or
``InvalidParameterError("annotations", ...)`` (single file). Issue codes:
UNKNOWN_CLASS, BAD_CLASS_INDEX, BAD_FORMAT, SIZE_MISMATCH (errors); UNCLASSIFIED,
UNSUPPORTED_GEOMETRY, DEGENERATE_POLYGON, OUT_OF_BOUNDS, OVERLAP, NO_ANNOTATIONS,
NOT_ANNOTATED, UNMATCHED_ANNOTATION (warnings). Repeats of one problem in a tile
are merged into one issue that lists where it happens (``features[3]``,
``annotations[5] (id 17)``, ``labels[2].component_models[0]``: 0-based positions
in the file), so a file with 500 broken shapes gives one line per problem.

Pixel convention: coordinates are continuous pixel units, x right, y down, with
pixel (col, row) covering ``[col, col+1) x [row, row+1)`` (what QuPath, COCO and
Django-Labeller's SVG canvas use). A pixel belongs to a shape when its centre
``(col + 0.5, row + 0.5)`` is inside; a centre exactly on an edge counts for the
left/top edge and not for the right/bottom one, so shapes that share an edge
never both claim a pixel and a square from 2 to 6 covers exactly pixels 2..5.
Rings are combined with the even-odd rule (a GeoJSON hole or a nested
Django-Labeller region is cut out); separate polygons of one annotation are
united. Pillow's ``ImageDraw.polygon`` is deliberately not used: it truncates
vertex coordinates toward zero and fills boundary pixels too, so that square
would come out 5 pixels wide and a vertex at 4.99 would act as 4; the numpy
scanline fill below is exact and costs time in proportion to the shape's height
times its vertex count, inside the shape's bounding box only.

Overlap policy: shapes are painted in file order and a later shape overwrites
an earlier one (Django-Labeller's own renderer does the same); when shapes of two
different classes overlap, one OVERLAP warning per tile says so.

Imports only numpy, Pillow, tifffile and ``segcore.errors`` (no torch), so a
service can render masks cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from segcore.errors import InvalidParameterError

FORMATS = ("masks", "instance-masks", "coco", "geojson", "labeller")
TILE_FORMATS = ("masks", "instance-masks", "geojson", "labeller")
COLLECTION_FORMATS = ("coco", "geojson")
UNLABELLED = 255
ERROR = "error"
WARNING = "warning"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic + BigTIFF
_TILE_KEYS = ("image", "tile", "image_name")  # GeoJSON properties naming a feature's tile
_NO_AREA_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")
_NO_AREA_LABELS = ("point", "polyline", "line")
_MAX_LISTED = 8  # places named in one merged issue before "and N more"
# Exports store float coordinates; a vertex at -1e-9 is rounding noise, not a shape leaving the tile.
_BOUNDS_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class AnnotationIssue:
    """One problem found while rendering annotations.

    ``severity`` is "error" (the training set is refused) or "warning" (stored
    with the set); ``tile`` is the tile's name (image file stem), "" for a
    problem of the whole annotation file.
    """

    severity: str
    code: str
    tile: str
    message: str


@dataclass
class Rendered:
    """A tile's mask (``uint8`` ``height x width``, always the tile's size) and its issues."""

    mask: np.ndarray
    issues: list[AnnotationIssue]

    @property
    def has_errors(self) -> bool:
        return any(issue.severity == ERROR for issue in self.issues)


def tile_stem(name: str) -> str:
    """The tile name for a file name as annotation files write it (any folder, either slash)."""
    return PurePosixPath(name.replace("\\", "/")).stem


# --------------------------------------------------------------------------- issue collection


def _join(places: Sequence[str]) -> str:
    shown = ", ".join(places[:_MAX_LISTED])
    extra = len(places) - _MAX_LISTED
    return f"{shown} and {extra} more" if extra > 0 else shown


class _Notes:
    """Collects one tile's issues, merging repeats of the same problem into one issue."""

    def __init__(self, tile: str) -> None:
        self.tile = tile
        self._groups: dict[tuple[str, str, str], list[str]] = {}

    def add(self, severity: str, code: str, detail: str, where: str = "") -> None:
        places = self._groups.setdefault((severity, code, detail), [])
        if where and where not in places:
            places.append(where)

    def has_errors(self) -> bool:
        return any(severity == ERROR for severity, _, _ in self._groups)

    def issues(self) -> list[AnnotationIssue]:
        return [
            AnnotationIssue(severity, code, self.tile, f"{_join(places)}: {detail}" if places else detail)
            for (severity, code, detail), places in self._groups.items()
        ]


class _Skip(Exception):
    """One annotation that cannot be used; carries the issue to report in its place."""

    def __init__(self, severity: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.severity = severity
        self.code = code
        self.detail = detail


def _not_annotated(tile: str, width: int, height: int, why: str) -> Rendered:
    # Unlabelled rather than background: nobody said these pixels hold no object.
    issue = AnnotationIssue(
        WARNING, "NOT_ANNOTATED", tile, f"{why}; every pixel is left unlabelled (255) and ignored by training"
    )
    return Rendered(np.full((height, width), UNLABELLED, np.uint8), [issue])


def _finish(mask: np.ndarray, notes: _Notes) -> Rendered:
    # Only worth saying when nothing else is wrong: after an error the set is refused anyway.
    if not notes.has_errors() and not np.any((mask > 0) & (mask != UNLABELLED)):
        notes.add(WARNING, "NO_ANNOTATIONS", "no pixel of any foreground class; the tile trains as background only")
    return Rendered(mask, notes.issues())


# --------------------------------------------------------------------------- parameters


def _class_index(class_names: Sequence[str]) -> dict[str, int]:
    names = list(class_names)
    if not names:
        raise InvalidParameterError("class_names", "at least one class is needed")
    if len(names) > UNLABELLED:
        raise InvalidParameterError("class_names", "at most 255 classes fit a uint8 mask next to 255 (unlabelled)")
    if any(not isinstance(name, str) or not name for name in names):
        raise InvalidParameterError("class_names", "class names must be non-empty strings")
    if len(set(names)) != len(names):
        raise InvalidParameterError("class_names", "class names must be unique")
    return {name: index for index, name in enumerate(names)}


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidParameterError("size", f"tile size must be positive, got {width}x{height}")


def _parse_json(data: bytes, fail: Callable[[str], Exception]) -> Any:
    if not data:
        raise fail("file is empty")
    try:
        # utf-8-sig: Windows tools often write a byte-order mark that json.loads rejects.
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc}") from exc


# --------------------------------------------------------------------------- rasterisation


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


def _rasterise(rings: Sequence[np.ndarray], width: int, height: int) -> tuple[int, int, np.ndarray] | None:
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


def _degenerate(ring: np.ndarray) -> bool:
    """Fewer than 3 distinct points, or all points on one line (zero area)."""
    if len(np.unique(ring, axis=0)) < 3:
        return True
    # Collinearity rather than the shoelace area: a self-crossing "bow tie" has signed
    # area 0 yet covers pixels under the even-odd rule.
    d = ring - ring[0]
    v = d[np.argmax(np.abs(d).sum(axis=1))]
    cross = d[:, 0] * v[1] - d[:, 1] * v[0]
    return bool(np.abs(cross).max() <= 1e-9 * max(1.0, float(np.abs(d).max()) ** 2))


def _outside(ring: np.ndarray, width: int, height: int) -> bool:
    x, y = ring[:, 0], ring[:, 1]
    low, tol = -_BOUNDS_TOLERANCE, _BOUNDS_TOLERANCE
    return bool((x < low).any() or (y < low).any() or (x > width + tol).any() or (y > height + tol).any())


# --------------------------------------------------------------------------- painting


@dataclass
class _Shape:
    """One annotation ready to paint: its class as written in the file and its geometry."""

    where: str
    label: object
    # Each piece is a list of rings combined by the even-odd rule; pieces are united.
    pieces: list[list[np.ndarray]] = field(default_factory=list)
    # True: ring 0 of a piece is its outline, later rings are holes (GeoJSON, COCO), so a
    # degenerate outline drops the piece. False: all rings are equal partners (Django-Labeller).
    outline_first: bool = True
    bitmap: np.ndarray | None = None  # COCO RLE, already the tile's size


class _Canvas:
    """Paints shapes in file order onto one tile's mask, noting what goes wrong."""

    def __init__(self, width: int, height: int, classes: Mapping[str, int], notes: _Notes) -> None:
        self.width, self.height = width, height
        self.classes = classes
        self.names = list(classes)
        self.notes = notes
        self.mask = np.zeros((height, width), np.uint8)
        self._painted = np.zeros((height, width), bool)
        self._overlap_noted = False

    def paint(self, shape: _Shape) -> None:
        index = self._resolve(shape.label, shape.where)
        if index is None:
            return
        if shape.bitmap is not None:
            self._fill(0, 0, shape.bitmap, index, shape.where)
        if any(_outside(ring, self.width, self.height) for piece in shape.pieces for ring in piece):
            detail = f"extends outside the {self.width}x{self.height} tile; clipped to it"
            self.notes.add(WARNING, "OUT_OF_BOUNDS", detail, shape.where)
        for j, piece in enumerate(shape.pieces):
            where = shape.where if len(shape.pieces) == 1 else f"{shape.where} polygon {j}"
            rings = self._usable(piece, where, shape.outline_first)
            window = _rasterise(rings, self.width, self.height) if rings else None
            if window is not None:
                self._fill(*window, index, shape.where)

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
            if not _degenerate(ring):
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
            detail = (f"overlaps an earlier annotation of class {earlier!r}; later annotations overwrite "
                      "earlier ones (reported once per tile)")
            self.notes.add(WARNING, "OVERLAP", detail, where)
            self._overlap_noted = True
        mask[inside] = index
        painted |= inside


def _paint_all(shapes: Iterable[_Shape], canvas: _Canvas) -> Rendered:
    for shape in shapes:
        canvas.paint(shape)
    return _finish(canvas.mask, canvas.notes)
