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

import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from segcore.errors import InvalidParameterError, InvalidTileError

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
            detail = (
                f"overlaps an earlier annotation of class {earlier!r}; later annotations overwrite "
                "earlier ones (reported once per tile)"
            )
            self.notes.add(WARNING, "OVERLAP", detail, where)
            self._overlap_noted = True
        mask[inside] = index
        painted |= inside


def _paint_all(shapes: Iterable[_Shape], canvas: _Canvas) -> Rendered:
    for shape in shapes:
        canvas.paint(shape)
    return _finish(canvas.mask, canvas.notes)


# --------------------------------------------------------------------------- coordinates


def _to_ring(pairs: Iterable[Any]) -> np.ndarray:
    """An ``N x 2`` float array of (x, y); extra values per point (GeoJSON z) are ignored."""
    try:
        ring = np.array([(float(p[0]), float(p[1])) for p in pairs], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise _Skip(ERROR, "BAD_FORMAT", f"coordinates are not (x, y) numbers ({exc})") from exc
    if not np.isfinite(ring).all():
        raise _Skip(ERROR, "BAD_FORMAT", "coordinates contain NaN or infinity")
    return ring


# --------------------------------------------------------------------------- GeoJSON (QuPath)


def _geojson_features(doc: Any) -> list[Any] | None:
    """The features of a FeatureCollection, of a single Feature, or a bare list of features."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    return None


def _properties(feature: Any) -> dict[str, Any]:
    props = feature.get("properties") if isinstance(feature, dict) else None
    return props if isinstance(props, dict) else {}


def _geojson_class(props: Mapping[str, Any]) -> object:
    """QuPath >= 0.2 writes ``classification: {name, color}``; older tools a plain string."""
    classification = props.get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    if classification is not None:
        return classification
    # 'class' before 'name': in QuPath 'name' is a free-text label of one object, not its class.
    for key in ("class", "name"):
        if props.get(key) is not None:
            return props[key]
    return None


def _polygon_rings(coords: Any) -> list[np.ndarray]:
    if not isinstance(coords, list) or not all(isinstance(ring, list) for ring in coords):
        raise _Skip(ERROR, "BAD_FORMAT", "Polygon coordinates must be a list of rings")
    return [_to_ring(ring) for ring in coords]


def _geometry_pieces(geometry: Any, where: str, notes: _Notes) -> list[list[np.ndarray]]:
    """Polygons of a geometry, each a list of rings (outline first, then holes)."""
    if geometry is None:
        raise _Skip(WARNING, "UNSUPPORTED_GEOMETRY", "has no geometry; skipped")
    if not isinstance(geometry, dict):
        raise _Skip(ERROR, "BAD_FORMAT", "geometry must be a GeoJSON geometry object")
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        return [_polygon_rings(coords)]
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise _Skip(ERROR, "BAD_FORMAT", "MultiPolygon coordinates must be a list of polygons")
        return [_polygon_rings(polygon) for polygon in coords]
    if kind == "GeometryCollection":
        return _collection_pieces(geometry.get("geometries"), where, notes)
    if kind in _NO_AREA_GEOMETRIES:
        raise _Skip(WARNING, "UNSUPPORTED_GEOMETRY", f"is a {kind}, which has no area; skipped")
    raise _Skip(ERROR, "BAD_FORMAT", f"unknown geometry type {kind!r}")


def _collection_pieces(members: Any, where: str, notes: _Notes) -> list[list[np.ndarray]]:
    if not isinstance(members, list):
        raise _Skip(ERROR, "BAD_FORMAT", "GeometryCollection needs a 'geometries' list")
    pieces: list[list[np.ndarray]] = []
    for k, member in enumerate(members):
        # One point inside a collection should not cost the polygons next to it.
        try:
            pieces.extend(_geometry_pieces(member, f"{where} geometries[{k}]", notes))
        except _Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, f"{where} geometries[{k}]")
    return pieces


def _geojson_shapes(items: Iterable[tuple[int, Any]], notes: _Notes) -> Iterator[_Shape]:
    for index, feature in items:
        where = f"features[{index}]"
        try:
            if not isinstance(feature, dict):
                raise _Skip(ERROR, "BAD_FORMAT", "is not a GeoJSON Feature object")
            pieces = _geometry_pieces(feature.get("geometry"), where, notes)
        except _Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, where)
            continue
        if pieces:
            yield _Shape(where, _geojson_class(_properties(feature)), pieces)


def _feature_tile(props: Mapping[str, Any]) -> str | None:
    for key in _TILE_KEYS:
        value = props.get(key)
        if isinstance(value, str) and value:
            return value
    return None


# --------------------------------------------------------------------------- Django-Labeller


def _xy(point: Any) -> tuple[Any, Any]:
    return point["x"], point["y"]


def _labeller_polygon(label: Mapping[str, Any]) -> list[np.ndarray]:
    # Older Django-Labeller files store a single region as 'vertices'.
    regions = [label["vertices"]] if "vertices" in label else label.get("regions")
    if not isinstance(regions, list) or not all(isinstance(region, list) for region in regions):
        raise _Skip(ERROR, "BAD_FORMAT", "polygon label needs 'regions': a list of lists of {x, y} points")
    return [_to_ring(_xy(point) for point in region) for region in regions]


def _labeller_box(label: Mapping[str, Any]) -> list[np.ndarray]:
    try:
        (cx, cy), (sx, sy) = _xy(label["centre"]), _xy(label["size"])
        cx, cy, hx, hy = float(cx), float(cy), abs(float(sx)) / 2, abs(float(sy)) / 2
    except (KeyError, TypeError, ValueError) as exc:
        raise _Skip(ERROR, "BAD_FORMAT", f"box label needs 'centre' and 'size' as {{x, y}} ({exc})") from exc
    return [_to_ring([(cx - hx, cy - hy), (cx + hx, cy - hy), (cx + hx, cy + hy), (cx - hx, cy + hy)])]


def _labeller_ellipse(label: Mapping[str, Any]) -> list[np.ndarray]:
    """An oriented ellipse as a polygon with about one vertex per pixel of perimeter (as the tool draws it)."""
    try:
        cx, cy = (float(v) for v in _xy(label["centre"]))
        r1, r2 = abs(float(label["radius1"])), abs(float(label["radius2"]))
        angle = float(label["orientation_radians"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _Skip(ERROR, "BAD_FORMAT", f"oriented_ellipse label needs centre, radii and orientation ({exc})") from exc
    if not all(math.isfinite(v) for v in (r1, r2, angle)):
        raise _Skip(ERROR, "BAD_FORMAT", "oriented_ellipse has a NaN or infinite parameter")
    theta = np.linspace(0.0, 2.0 * math.pi, max(16, math.ceil(2.0 * math.pi * max(r1, r2))), endpoint=False)
    u, v = r1 * np.cos(theta), r2 * np.sin(theta)
    x = cx + u * math.cos(angle) - v * math.sin(angle)
    y = cy + u * math.sin(angle) + v * math.cos(angle)
    return [_to_ring(zip(x, y, strict=True))]


def _labeller_label(label: Any, where: str, notes: _Notes, group_class: str | None) -> Iterator[_Shape]:
    if not isinstance(label, dict):
        raise _Skip(ERROR, "BAD_FORMAT", "is not a label object")
    kind = label.get("label_type")
    # A classified group paints all its members in its own class, as Django-Labeller's
    # render_label_classes does; an unclassified group leaves each member its own class.
    label_class = group_class if group_class is not None else label.get("label_class")
    if kind == "polygon":
        # Regions are XOR-ed like the tool's renderer: a region inside another is a hole.
        yield _Shape(where, label_class, [_labeller_polygon(label)], outline_first=False)
    elif kind == "box":
        yield _Shape(where, label_class, [_labeller_box(label)])
    elif kind == "oriented_ellipse":
        yield _Shape(where, label_class, [_labeller_ellipse(label)])
    elif kind == "group":
        members = label.get("component_models")
        if not isinstance(members, list):
            raise _Skip(ERROR, "BAD_FORMAT", "group label needs a 'component_models' list")
        inherited = label_class if isinstance(label_class, str) and label_class.strip() else None
        yield from _labeller_shapes(members, f"{where}.component_models", notes, inherited)
    elif kind in _NO_AREA_LABELS:
        raise _Skip(WARNING, "UNSUPPORTED_GEOMETRY", f"is a {kind} label, which has no area; skipped")
    elif kind != "composite":  # a composite only refers to other labels, which are painted on their own
        raise _Skip(ERROR, "BAD_FORMAT", f"unknown label_type {kind!r}")


def _labeller_shapes(labels: list[Any], prefix: str, notes: _Notes, group_class: str | None = None) -> Iterator[_Shape]:
    for i, label in enumerate(labels):
        where = f"{prefix}[{i}]"
        try:
            yield from _labeller_label(label, where, notes, group_class)
        except _Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, where)


def _labeller_labels(doc: Any, tile: str) -> list[Any]:
    labels = doc.get("labels") if isinstance(doc, dict) else doc
    if not isinstance(labels, list):
        raise InvalidTileError(
            tile, "expected Django-Labeller JSON: an object with a 'labels' list, or a list of labels"
        )
    return labels


# --------------------------------------------------------------------------- COCO


def decode_rle_string(counts: str) -> list[int]:
    """Run lengths from COCO's compressed RLE string (pycocotools ``rleFrString``).

    Each run is a varint of 5-bit groups, least significant first, each stored as
    ``chr(group + 48)`` so the string stays printable: bit 0x20 says another group
    follows, bit 0x10 of the last group is the sign. From the fourth run on, the
    stored value is the difference to the run two places back (so alternating
    background/foreground runs of steady length compress well). Raises ValueError.
    """
    runs: list[int] = []
    value = shift = 0
    for pos, char in enumerate(counts):
        group = ord(char) - 48
        if not 0 <= group < 64:
            raise ValueError(f"character {char!r} at position {pos} cannot occur in a COCO RLE string")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift  # sign extension, as the C code's `x |= -1 << 5*k`
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the string ends in the middle of a number")
    return runs


def rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean ``height x width`` mask from COCO run lengths.

    Runs alternate background/foreground starting with background (a mask that
    starts with foreground begins with a 0 run) and walk the image column by
    column (Fortran order), as pycocotools does. Raises ValueError unless the runs
    are non-negative integers adding up to ``height * width``.
    """
    try:
        runs = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run lengths must be numbers ({exc})") from exc
    if runs.ndim != 1 or not np.isfinite(runs).all() or (runs < 0).any() or (runs != np.round(runs)).any():
        raise ValueError("run lengths must be a flat list of non-negative integers")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"run lengths add up to {total}, not height x width = {height * width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs.astype(np.int64))
    return np.ascontiguousarray(flat.reshape(width, height).T)


def _coco_rle(segmentation: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise _Skip(ERROR, "BAD_FORMAT", "RLE segmentation needs 'size': [height, width]")
    if (size[0], size[1]) != (height, width):
        detail = f"RLE size is {size[1]}x{size[0]} (width x height) but the tile is {width}x{height}"
        raise _Skip(ERROR, "SIZE_MISMATCH", detail)
    try:
        if isinstance(counts, str):
            return rle_to_mask(decode_rle_string(counts), height, width)
        if isinstance(counts, list):
            return rle_to_mask(counts, height, width)
        raise ValueError("'counts' must be a list of run lengths or a compressed string")
    except ValueError as exc:
        raise _Skip(ERROR, "BAD_FORMAT", f"bad RLE: {exc}") from exc


def _flat_ring(polygon: Any) -> np.ndarray:
    if not isinstance(polygon, list):
        raise _Skip(ERROR, "BAD_FORMAT", "a polygon must be a flat list [x1, y1, x2, y2, ...]")
    if len(polygon) % 2:
        raise _Skip(ERROR, "BAD_FORMAT", "a polygon has an odd number of coordinates")
    return _to_ring(zip(polygon[0::2], polygon[1::2], strict=True))


def _hashable_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _coco_where(index: int, annotation: Any) -> str:
    ann_id = annotation.get("id") if isinstance(annotation, dict) else None
    return f"annotations[{index}] (id {ann_id})" if ann_id is not None else f"annotations[{index}]"


def _coco_shape(annotation: Any, categories: Mapping[Any, str], width: int, height: int, where: str) -> _Shape:
    if not isinstance(annotation, dict):
        raise _Skip(ERROR, "BAD_FORMAT", "is not an annotation object")
    category = annotation.get("category_id")
    if not _hashable_id(category) or category not in categories:
        raise _Skip(ERROR, "BAD_FORMAT", f"category_id {category!r} is not in 'categories'")
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        return _Shape(where, categories[category], bitmap=_coco_rle(segmentation, width, height))
    if not segmentation:
        raise _Skip(WARNING, "UNSUPPORTED_GEOMETRY", "has no segmentation (a box-only annotation?); skipped")
    if not isinstance(segmentation, list):
        raise _Skip(ERROR, "BAD_FORMAT", "segmentation must be a list of polygons or an RLE object")
    if all(isinstance(v, int | float) for v in segmentation):
        segmentation = [segmentation]  # some exporters drop the outer list of a single polygon
    # Several polygons of one annotation are parts of one object: united, not XOR-ed.
    return _Shape(where, categories[category], [[_flat_ring(polygon)] for polygon in segmentation])


_Reader = Callable[[list[tuple[int, Any]], int, int, _Notes], Iterator[_Shape]]


def _coco_reader(categories: Mapping[Any, str]) -> _Reader:
    def read(items: list[tuple[int, Any]], width: int, height: int, notes: _Notes) -> Iterator[_Shape]:
        for index, annotation in items:
            where = _coco_where(index, annotation)
            try:
                yield _coco_shape(annotation, categories, width, height, where)
            except _Skip as skip:
                notes.add(skip.severity, skip.code, skip.detail, where)

    return read


def _geojson_reader(items: list[tuple[int, Any]], width: int, height: int, notes: _Notes) -> Iterator[_Shape]:
    return _geojson_shapes(items, notes)


# --------------------------------------------------------------------------- collections


@dataclass
class _Entry:
    """One image of a collection file."""

    name: str  # the file name as the annotation file writes it
    size: tuple[int, int] | None  # (width, height) the file declares, checked against the tile
    items: list[tuple[int, Any]]  # (position in the file, raw annotation or feature)


class AnnotationCollection:
    """The annotations of many tiles from one file (COCO JSON, multi-tile GeoJSON), rendered per tile.

    ``issues`` holds problems of the file itself (tile ""); tiles are matched by
    file stem (``tile_stem``), exactly and case-sensitively.
    """

    def __init__(
        self,
        fmt: str,
        classes: Mapping[str, int],
        entries: dict[str, _Entry],
        issues: list[AnnotationIssue],
        reader: _Reader,
        *,
        missing_unlabelled: bool,
    ) -> None:
        self.format = fmt
        self.issues = issues
        self._classes = dict(classes)
        self._entries = entries
        self._reader = reader
        # COCO lists its images, so a tile it does not list was never annotated (unlabelled);
        # a GeoJSON file cannot list an image without features, so there absence means "empty".
        self._missing_unlabelled = missing_unlabelled

    @property
    def tiles(self) -> list[str]:
        """Tile names (file stems) the file has an entry for."""
        return sorted(self._entries)

    def render(self, *, tile: str, width: int, height: int) -> Rendered:
        """The mask of ``tile`` (an image file stem) of ``width`` x ``height`` pixels."""
        _check_size(width, height)
        entry = self._entries.get(tile)
        if entry is None and self._missing_unlabelled:
            return _not_annotated(tile, width, height, f"the {self.format} file does not list this tile")
        notes = _Notes(tile)
        canvas = _Canvas(width, height, self._classes, notes)
        if entry is None:
            return _finish(canvas.mask, notes)
        if entry.size is not None and entry.size != (width, height):
            w, h = entry.size
            notes.add(
                ERROR,
                "SIZE_MISMATCH",
                f"the annotation file gives {entry.name!r} as {w}x{h} pixels but the tile is {width}x{height}",
            )
        return _paint_all(self._reader(entry.items, width, height, notes), canvas)

    def unmatched(self, tiles: Iterable[str]) -> list[AnnotationIssue]:
        """Warnings for annotated images of the file that are not among ``tiles`` (file stems)."""
        present = set(tiles)
        return [
            AnnotationIssue(
                WARNING,
                "UNMATCHED_ANNOTATION",
                stem,
                f"{entry.name!r} has {len(entry.items)} annotation(s) but no tile is named {stem!r}; they are ignored",
            )
            for stem, entry in sorted(self._entries.items())
            if entry.items and stem not in present
        ]


def _declared_size(image: Mapping[str, Any]) -> tuple[int, int] | None:
    width, height = image.get("width"), image.get("height")
    return (width, height) if isinstance(width, int) and isinstance(height, int) else None


def _coco_categories(categories: list[Any], notes: _Notes) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for index, category in enumerate(categories):
        if isinstance(category, dict) and _hashable_id(category.get("id")) and isinstance(category.get("name"), str):
            names[category["id"]] = category["name"]
        else:
            notes.add(ERROR, "BAD_FORMAT", "needs an 'id' and a 'name'", f"categories[{index}]")
    return names


def _coco_images(images: list[Any], notes: _Notes) -> tuple[dict[Any, str], dict[str, _Entry]]:
    """Image id -> tile stem, and one entry per stem (two files with one stem are ambiguous: error)."""
    by_id: dict[Any, str] = {}
    entries: dict[str, _Entry] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        if not (isinstance(image, dict) and _hashable_id(image.get("id")) and isinstance(image.get("file_name"), str)):
            notes.add(ERROR, "BAD_FORMAT", "needs an 'id' and a 'file_name'", where)
            continue
        stem = tile_stem(image["file_name"])
        if image["id"] in by_id:
            notes.add(ERROR, "BAD_FORMAT", f"image id {image['id']!r} is used twice", where)
        elif stem in entries:
            notes.add(
                ERROR,
                "BAD_FORMAT",
                f"{image['file_name']!r} has the same tile name as "
                f"{entries[stem].name!r}; tiles are matched by file stem",
                where,
            )
        else:
            by_id[image["id"]] = stem
            entries[stem] = _Entry(image["file_name"], _declared_size(image), [])
    return by_id, entries


def _load_coco(doc: Any, classes: Mapping[str, int]) -> AnnotationCollection:
    if not (
        isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories"))
    ):
        raise InvalidParameterError("annotations", "a COCO file needs 'images', 'annotations' and 'categories' lists")
    notes = _Notes("")
    categories = _coco_categories(doc["categories"], notes)
    by_id, entries = _coco_images(doc["images"], notes)
    for index, annotation in enumerate(doc["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        stem = by_id.get(image_id) if _hashable_id(image_id) else None
        if stem is None:
            notes.add(
                WARNING, "UNMATCHED_ANNOTATION", "image_id is not in 'images'; ignored", _coco_where(index, annotation)
            )
        else:
            entries[stem].items.append((index, annotation))
    return AnnotationCollection(
        "coco", classes, entries, notes.issues(), _coco_reader(categories), missing_unlabelled=True
    )


def _load_geojson(doc: Any, classes: Mapping[str, int]) -> AnnotationCollection:
    features = _geojson_features(doc)
    if features is None:
        raise InvalidParameterError("annotations", "expected a GeoJSON FeatureCollection, a Feature or a list of them")
    notes = _Notes("")
    entries: dict[str, _Entry] = {}
    for index, feature in enumerate(features):
        name = _feature_tile(_properties(feature))
        if name is None:
            notes.add(
                ERROR,
                "BAD_FORMAT",
                f"does not name its tile in properties {', '.join(_TILE_KEYS)}",
                f"features[{index}]",
            )
            continue
        entries.setdefault(tile_stem(name), _Entry(name, None, [])).items.append((index, feature))
    if features and not entries:
        raise InvalidParameterError(
            "annotations",
            "no feature names its tile in properties 'image', 'tile' or "
            "'image_name'; upload one GeoJSON file per tile instead",
        )
    return AnnotationCollection("geojson", classes, entries, notes.issues(), _geojson_reader, missing_unlabelled=False)


# --------------------------------------------------------------------------- label images


def _pil_labels(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        return np.asarray(img)  # palette masks store labels as palette positions, not colours
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    return np.asarray(img)  # L, LA, RGB(A), I;16 (uint16), I (int32: 16/32-bit PNG), F


def _read_image(data: bytes, tile: str) -> np.ndarray:
    """Raw pixel array of a PNG/TIFF label image, in the file's own dtype."""
    if not data:
        raise InvalidTileError(tile, "file is empty")
    try:
        # tifffile for TIFF: Pillow misses many scientific layouts (32-bit, float, BigTIFF).
        if data[:4] in _TIFF_MAGIC:
            arr = np.asarray(tifffile.imread(io.BytesIO(data)))
        else:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # a full decode, so truncated files fail here
                arr = _pil_labels(img)
    except UnidentifiedImageError as exc:
        raise InvalidTileError(tile, "not a recognised PNG or TIFF image") from exc
    except Exception as exc:  # Pillow and tifffile raise assorted types for corrupt data
        raise InvalidTileError(tile, f"cannot decode image: {exc}") from exc
    if arr.size == 0:  # tifffile only logs a warning for a TIFF whose first page is missing
        raise InvalidTileError(tile, "image has no pixels (corrupt or empty file)")
    return arr


def _labels_2d(arr: np.ndarray, notes: _Notes, *, any_colour: bool) -> np.ndarray | None:
    """One int64 label per pixel, or None (error noted) for a layout that is not a label image."""
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr = arr[:, :, 0]  # grey, or grey + alpha
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[:, :, :3]
        if any_colour:
            arr = np.asarray(rgb.any(axis=2))  # colour-coded instances: any non-black pixel is an object
        elif (rgb == rgb[:, :, :1]).all():
            arr = rgb[:, :, 0]
        else:
            notes.add(
                ERROR,
                "BAD_FORMAT",
                "mask has colour channels with different values; expected class indices (a grey or palette image)",
            )
            return None
    if arr.ndim != 2:
        notes.add(ERROR, "BAD_FORMAT", f"expected a 2-D label image, got an array of shape {arr.shape}")
        return None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        notes.add(ERROR, "BAD_FORMAT", f"unsupported pixel type {arr.dtype}")
        return None
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        notes.add(ERROR, "BAD_FORMAT", "mask has fractional or NaN values; expected integer labels")
        return None
    return arr.astype(np.int64)


def _size_matches(labels: np.ndarray, width: int, height: int, notes: _Notes) -> bool:
    if labels.shape == (height, width):
        return True
    h, w = labels.shape
    notes.add(ERROR, "SIZE_MISMATCH", f"mask is {w}x{h} pixels but the image is {width}x{height}")
    return False


def _render_class_mask(data: bytes, tile: str, width: int, height: int, n_classes: int) -> Rendered:
    notes = _Notes(tile)
    labels = _labels_2d(_read_image(data, tile), notes, any_colour=False)
    if labels is None or not _size_matches(labels, width, height, notes):
        return Rendered(np.full((height, width), UNLABELLED, np.uint8), notes.issues())
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != UNLABELLED)
    if bad.any():
        values = _join([str(v) for v in np.unique(labels[bad]).tolist()])
        notes.add(
            ERROR,
            "BAD_CLASS_INDEX",
            f"mask values {values} are not class indices (0..{n_classes - 1}) or 255 (unlabelled)",
        )
        labels = np.where(bad, UNLABELLED, labels)
    return _finish(labels.astype(np.uint8), notes)


def _render_instance_mask(data: bytes, tile: str, width: int, height: int, instance_class: int) -> Rendered:
    notes = _Notes(tile)
    labels = _labels_2d(_read_image(data, tile), notes, any_colour=True)
    if labels is None or not _size_matches(labels, width, height, notes):
        return Rendered(np.full((height, width), UNLABELLED, np.uint8), notes.issues())
    # Instance ids only tell objects apart; semantic training needs "object or not".
    return _finish(np.where(labels != 0, instance_class, 0).astype(np.uint8), notes)


# --------------------------------------------------------------------------- entry points


def render_tile(
    fmt: str,
    annotation: bytes | None,
    *,
    tile: str,
    width: int,
    height: int,
    class_names: Sequence[str],
    instance_class: int = 1,
) -> Rendered:
    """Render one tile's annotation file (a per-tile format) into its class-index mask.

    ``annotation`` None means no file was uploaded for the tile: the mask is all
    255 with a NOT_ANNOTATED warning. For ``instance-masks`` every non-zero label
    becomes ``instance_class``. Raises InvalidTileError(tile, ...) for bytes that
    cannot be decoded, InvalidParameterError for bad arguments.
    """
    classes = _class_index(class_names)
    _check_size(width, height)
    if fmt not in TILE_FORMATS:
        hint = "; it covers many tiles: use load_collection" if fmt == "coco" else ""
        raise InvalidParameterError("format", f"{fmt!r} is not a per-tile format ({', '.join(TILE_FORMATS)}){hint}")
    if fmt == "instance-masks" and not 1 <= instance_class < len(classes):
        raise InvalidParameterError(
            "instance_class", f"must be a class index in 1..{len(classes) - 1}, got {instance_class}"
        )
    if annotation is None:
        return _not_annotated(tile, width, height, "no annotation file was uploaded for this tile")
    if fmt == "masks":
        return _render_class_mask(annotation, tile, width, height, len(classes))
    if fmt == "instance-masks":
        return _render_instance_mask(annotation, tile, width, height, instance_class)
    doc = _parse_json(annotation, lambda reason: InvalidTileError(tile, reason))
    canvas = _Canvas(width, height, classes, _Notes(tile))
    if fmt == "geojson":
        features = _geojson_features(doc)
        if features is None:
            raise InvalidTileError(tile, "expected a GeoJSON FeatureCollection, a Feature or a list of features")
        return _paint_all(_geojson_shapes(enumerate(features), canvas.notes), canvas)
    return _paint_all(_labeller_shapes(_labeller_labels(doc, tile), "labels", canvas.notes), canvas)


def load_collection(fmt: str, data: bytes, class_names: Sequence[str]) -> AnnotationCollection:
    """Parse a single annotation file covering many tiles (``coco`` or multi-tile ``geojson``).

    Raises InvalidParameterError("annotations", ...) for a file that is not JSON
    or lacks the format's structure; problems inside it become issues (the
    collection's own ``issues`` for the file, ``render`` for each tile).
    """
    classes = _class_index(class_names)
    if fmt not in COLLECTION_FORMATS:
        raise InvalidParameterError("format", f"{fmt!r} is not a single-file format ({', '.join(COLLECTION_FORMATS)})")
    doc = _parse_json(data, lambda reason: InvalidParameterError("annotations", reason))
    return _load_coco(doc, classes) if fmt == "coco" else _load_geojson(doc, classes)
