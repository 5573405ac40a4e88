"""Property tests over every annotation parser and the image decoders: arbitrary bytes, arbitrary
JSON and mutated real files never raise anything but the domain errors (InvalidTileError naming
the tile, InvalidParameterError naming the field, ValueError from the RLE decoder), and what
they return has the tile's shape.

`make test` runs SEGTRAIN_FUZZ_EXAMPLES (default 150) examples per property; `make fuzz` runs
many more (see the Makefile)."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segcore import imaging
from segcore.annotations import (
    COLLECTION_FORMATS,
    TILE_FORMATS,
    decode_rle_string,
    load_collection,
    render_tile,
    rle_to_mask,
)
from segcore.errors import InvalidParameterError, InvalidTileError

EXAMPLES = int(os.environ.get("SEGTRAIN_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLASSES = ["background", "tumor", "stroma"]
SIZE = 16

# JSON values biased towards the shapes the formats read: numbers, pairs, class names, the keys
# of GeoJSON, COCO and Django-Labeller.
KEYS = st.sampled_from(["type", "features", "geometry", "coordinates", "properties", "classification", "name",
                        "images", "annotations", "categories", "id", "image_id", "category_id", "segmentation",
                        "size", "counts", "file_name", "width", "height", "labels", "label_type", "regions",
                        "label_class", "centre", "radii", "orientation", "component_models", "x", "y",
                        "image", "tile", "geometries", "object_type", "image_filename"])
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["Polygon", "MultiPolygon", "Feature", "FeatureCollection", "GeometryCollection",
                              "Point", "polygon", "box", "oriented_ellipse", "group", *CLASSES, "t1", "t1.png"])
           | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(KEYS, inner, max_size=6),
                    max_leaves=60)
# Bytes that are JSON nested deeper than any limit (the interpreter's recursion limit included).
DEEP = st.integers(1, 5000).map(lambda n: b'{"features": ' * (n % 3) + b"[" * n + b"]" * n + b"}" * (n % 3))


def _rendered_ok(rendered: Any) -> None:
    assert rendered.mask.shape == (SIZE, SIZE) and rendered.mask.dtype == np.uint8


@fuzz
@given(fmt=st.sampled_from(TILE_FORMATS), data=st.binary(max_size=2048) | DEEP)
def test_per_tile_formats_take_any_bytes(fmt: str, data: bytes) -> None:
    try:
        _rendered_ok(render_tile(fmt, data, tile="t1", width=SIZE, height=SIZE, class_names=CLASSES))
    except InvalidTileError as exc:
        assert exc.tile == "t1"


@fuzz
@given(fmt=st.sampled_from(["geojson", "labeller"]), doc=JSON)
def test_per_tile_json_formats_take_any_json(fmt: str, doc: Any) -> None:
    data = json.dumps(doc).encode()
    try:
        _rendered_ok(render_tile(fmt, data, tile="t1", width=SIZE, height=SIZE, class_names=CLASSES))
    except InvalidTileError as exc:
        assert exc.tile == "t1"


@fuzz
@given(fmt=st.sampled_from(COLLECTION_FORMATS), doc=JSON | st.binary(max_size=512) | DEEP)
def test_collection_formats_take_any_json_or_bytes(fmt: str, doc: Any) -> None:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    try:
        collection = load_collection(fmt, data, CLASSES)
    except InvalidParameterError as exc:
        assert exc.field == "annotations"
        return
    for tile in ("t1", "tile_a"):
        _rendered_ok(collection.render(tile=tile, width=SIZE, height=SIZE))
    list(collection.unmatched(["t1"]))


def _coco(segmentation: Any) -> bytes:
    return json.dumps({"images": [{"id": 1, "file_name": "t1.png", "width": SIZE, "height": SIZE}],
                       "categories": [{"id": 1, "name": "tumor"}],
                       "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                        "segmentation": segmentation}]}).encode()


@fuzz
@given(segmentation=JSON | st.fixed_dictionaries({"size": st.just([SIZE, SIZE]), "counts": st.text(max_size=64)})
       | st.fixed_dictionaries({"size": st.just([SIZE, SIZE]), "counts": st.lists(st.integers(-5, 300))}))
def test_coco_segmentations_of_any_shape_are_issues_not_errors(segmentation: Any) -> None:
    _rendered_ok(load_collection("coco", _coco(segmentation), CLASSES).render(tile="t1", width=SIZE, height=SIZE))


@fuzz
@given(counts=st.text(max_size=256))
def test_the_rle_decoder_raises_only_value_errors(counts: str) -> None:
    try:
        runs = decode_rle_string(counts)
        mask = rle_to_mask(runs, SIZE, SIZE)
    except ValueError:
        return
    assert mask.shape == (SIZE, SIZE)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(arr: np.ndarray, **options: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", **options)
    return buf.getvalue()


REAL = [_png(np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)),
        _png(np.zeros((SIZE, SIZE, 3), np.uint8)),
        _tiff(np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE)),
        _tiff(np.ones((SIZE, SIZE, 3), np.float32), photometric="rgb")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real PNG or TIFF with some bytes changed, cut short or spliced."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@fuzz
@given(data=mutated() | st.binary(max_size=1024))
def test_the_image_decoders_take_any_bytes(data: bytes) -> None:
    for decode in (imaging.decode_image, imaging.decode_mask):
        try:
            arr = decode(data, "t1", max_side=64)
        except InvalidTileError as exc:
            assert exc.tile == "t1"
            continue
        assert arr.ndim in (2, 3) and max(arr.shape[:2]) <= 64
    try:
        _rendered_ok(render_tile("masks", data, tile="t1", width=SIZE, height=SIZE, class_names=CLASSES))
    except InvalidTileError as exc:
        assert exc.tile == "t1"
