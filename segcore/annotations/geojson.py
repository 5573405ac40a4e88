"""QuPath GeoJSON: features to shapes, for one tile's file or a file covering many tiles.

This module owns the reading of GeoJSON as QuPath exports it: a
FeatureCollection, a single Feature or a bare list of features; Polygon,
MultiPolygon and GeometryCollection geometries (the first ring of a polygon is
its outline, later rings are holes); the class from ``properties.classification``
(``{name, color}`` in QuPath >= 0.2, a plain string in older tools), then
``class``, then ``name``. Points and lines have no area and are skipped with an
UNSUPPORTED_GEOMETRY warning. In a multi-tile file each feature names its tile
in ``properties.image``, ``tile`` or ``image_name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from segcore.annotations.canvas import Shape, to_ring
from segcore.annotations.collection import AnnotationCollection, Entry, tile_stem
from segcore.annotations.issues import ERROR, WARNING, Notes, Skip
from segcore.errors import InvalidParameterError

_TILE_KEYS = ("image", "tile", "image_name")  # GeoJSON properties naming a feature's tile
_NO_AREA_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")


def geojson_features(doc: Any) -> list[Any] | None:
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
        raise Skip(ERROR, "BAD_FORMAT", "Polygon coordinates must be a list of rings")
    return [to_ring(ring) for ring in coords]


def _geometry_pieces(geometry: Any, where: str, notes: Notes) -> list[list[np.ndarray]]:
    """Polygons of a geometry, each a list of rings (outline first, then holes)."""
    if geometry is None:
        raise Skip(WARNING, "UNSUPPORTED_GEOMETRY", "has no geometry; skipped")
    if not isinstance(geometry, dict):
        raise Skip(ERROR, "BAD_FORMAT", "geometry must be a GeoJSON geometry object")
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        return [_polygon_rings(coords)]
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise Skip(ERROR, "BAD_FORMAT", "MultiPolygon coordinates must be a list of polygons")
        return [_polygon_rings(polygon) for polygon in coords]
    if kind == "GeometryCollection":
        return _collection_pieces(geometry.get("geometries"), where, notes)
    if kind in _NO_AREA_GEOMETRIES:
        raise Skip(WARNING, "UNSUPPORTED_GEOMETRY", f"is a {kind}, which has no area; skipped")
    raise Skip(ERROR, "BAD_FORMAT", f"unknown geometry type {kind!r}")


def _collection_pieces(members: Any, where: str, notes: Notes) -> list[list[np.ndarray]]:
    if not isinstance(members, list):
        raise Skip(ERROR, "BAD_FORMAT", "GeometryCollection needs a 'geometries' list")
    pieces: list[list[np.ndarray]] = []
    for k, member in enumerate(members):
        # One point inside a collection should not cost the polygons next to it.
        try:
            pieces.extend(_geometry_pieces(member, f"{where} geometries[{k}]", notes))
        except Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, f"{where} geometries[{k}]")
    return pieces


def geojson_shapes(items: Iterable[tuple[int, Any]], notes: Notes) -> Iterator[Shape]:
    """Shapes of ``(position, feature)`` items; unusable features are noted and skipped."""
    for index, feature in items:
        where = f"features[{index}]"
        try:
            if not isinstance(feature, dict):
                raise Skip(ERROR, "BAD_FORMAT", "is not a GeoJSON Feature object")
            pieces = _geometry_pieces(feature.get("geometry"), where, notes)
        except Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, where)
            continue
        if pieces:
            yield Shape(where, _geojson_class(_properties(feature)), pieces)


def _feature_tile(props: Mapping[str, Any]) -> str | None:
    for key in _TILE_KEYS:
        value = props.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _geojson_reader(items: list[tuple[int, Any]], width: int, height: int, notes: Notes) -> Iterator[Shape]:
    # A collection ``Reader``: GeoJSON shapes do not depend on the tile's size (clipping is the canvas's job).
    return geojson_shapes(items, notes)


def load_geojson(doc: Any, classes: Mapping[str, int]) -> AnnotationCollection:
    """A multi-tile GeoJSON document, its features grouped by the tile their properties name."""
    features = geojson_features(doc)
    if features is None:
        raise InvalidParameterError("annotations", "expected a GeoJSON FeatureCollection, a Feature or a list of them")
    notes = Notes("")
    entries: dict[str, Entry] = {}
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
        entries.setdefault(tile_stem(name), Entry(name, None, [])).items.append((index, feature))
    if features and not entries:
        raise InvalidParameterError(
            "annotations",
            "no feature names its tile in properties 'image', 'tile' or "
            "'image_name'; upload one GeoJSON file per tile instead",
        )
    return AnnotationCollection("geojson", classes, entries, notes.issues(), _geojson_reader, missing_unlabelled=False)
