"""Rendering of exported annotations into class-index masks, with precise problem reports.

This package owns the annotation formats segtrain accepts and the rules that turn
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
UNKNOWN_CLASS, BAD_CLASS_INDEX, BAD_FORMAT, SIZE_MISMATCH, TOO_COMPLEX (errors: a shape or tile
over segcore.limits); UNCLASSIFIED,
UNSUPPORTED_GEOMETRY, DEGENERATE_POLYGON, OUT_OF_BOUNDS, OVERLAP, NO_ANNOTATIONS,
NOT_ANNOTATED, UNMATCHED_ANNOTATION (warnings). Repeats of one problem in a tile
are merged into one issue that lists where it happens.

This file holds the two entry points and the public names; import from here.
The modules behind it:

* ``issues``     - AnnotationIssue, Rendered, merging of repeated problems
* ``params``     - argument checks and JSON decoding (what raises)
* ``raster``     - the exact scanline polygon fill and its pixel-centre convention
* ``canvas``     - Shape, and painting shapes in file order (overlap policy)
* ``masks``      - class-index and instance label images
* ``geojson``    - QuPath GeoJSON, per tile or many tiles in one file
* ``labeller``   - Django-Labeller per-image JSON
* ``coco``       - COCO JSON, polygons and RLE (decode_rle_string, rle_to_mask)
* ``collection`` - AnnotationCollection, tile matching by file stem (tile_stem)

Imports only numpy, Pillow, tifffile and ``segcore.errors`` (no torch), so a
service can render masks cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

from segcore.annotations.canvas import Canvas, paint_all
from segcore.annotations.coco import decode_rle_string, load_coco, rle_to_mask
from segcore.annotations.collection import AnnotationCollection, tile_stem
from segcore.annotations.geojson import geojson_features, geojson_shapes, load_geojson
from segcore.annotations.issues import ERROR, UNLABELLED, WARNING, AnnotationIssue, Notes, Rendered, not_annotated
from segcore.annotations.labeller import labeller_labels, labeller_shapes
from segcore.annotations.masks import render_class_mask, render_instance_mask
from segcore.annotations.params import check_size, class_index, parse_json
from segcore.errors import InvalidParameterError, InvalidTileError

__all__ = [
    "COLLECTION_FORMATS",
    "ERROR",
    "FORMATS",
    "RASTER_FORMATS",
    "TILE_FORMATS",
    "UNLABELLED",
    "WARNING",
    "AnnotationCollection",
    "AnnotationIssue",
    "Rendered",
    "decode_rle_string",
    "load_collection",
    "render_tile",
    "rle_to_mask",
    "tile_stem",
]

FORMATS = ("masks", "instance-masks", "coco", "geojson", "labeller")
TILE_FORMATS = ("masks", "instance-masks", "geojson", "labeller")
RASTER_FORMATS = ("masks", "instance-masks")  # label images; the others are JSON
COLLECTION_FORMATS = ("coco", "geojson")


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
    classes = class_index(class_names)
    check_size(width, height)
    if fmt not in TILE_FORMATS:
        hint = "; it covers many tiles: use load_collection" if fmt == "coco" else ""
        raise InvalidParameterError("format", f"{fmt!r} is not a per-tile format ({', '.join(TILE_FORMATS)}){hint}")
    if fmt == "instance-masks" and not 1 <= instance_class < len(classes):
        raise InvalidParameterError(
            "instance_class", f"must be a class index in 1..{len(classes) - 1}, got {instance_class}"
        )
    if annotation is None:
        return not_annotated(tile, width, height, "no annotation file was uploaded for this tile")
    if fmt == "masks":
        return render_class_mask(annotation, tile, width, height, len(classes))
    if fmt == "instance-masks":
        return render_instance_mask(annotation, tile, width, height, instance_class)
    doc = parse_json(annotation, lambda reason: InvalidTileError(tile, reason))
    canvas = Canvas(width, height, classes, Notes(tile))
    if fmt == "geojson":
        features = geojson_features(doc)
        if features is None:
            raise InvalidTileError(tile, "expected a GeoJSON FeatureCollection, a Feature or a list of features")
        return paint_all(geojson_shapes(enumerate(features), canvas.notes), canvas)
    return paint_all(labeller_shapes(labeller_labels(doc, tile), "labels", canvas.notes), canvas)


def load_collection(fmt: str, data: bytes, class_names: Sequence[str]) -> AnnotationCollection:
    """Parse a single annotation file covering many tiles (``coco`` or multi-tile ``geojson``).

    Raises InvalidParameterError("annotations", ...) for a file that is not JSON
    or lacks the format's structure; problems inside it become issues (the
    collection's own ``issues`` for the file, ``render`` for each tile).
    """
    classes = class_index(class_names)
    if fmt not in COLLECTION_FORMATS:
        raise InvalidParameterError("format", f"{fmt!r} is not a single-file format ({', '.join(COLLECTION_FORMATS)})")
    doc = parse_json(data, lambda reason: InvalidParameterError("annotations", reason))
    return load_coco(doc, classes) if fmt == "coco" else load_geojson(doc, classes)
