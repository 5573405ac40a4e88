"""Annotation formats rendered to class-index masks: pixels, issues, errors.

Expected masks are written out by hand as strings (one per row; digits are class
indices, "x" is 255). The pixel convention under test: a pixel belongs to a shape
when its centre (col + 0.5, row + 0.5) is inside; an edge through a centre
counts for the left/top edge only.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from segcore.annotations import (
    ERROR,
    WARNING,
    AnnotationIssue,
    Rendered,
    decode_rle_string,
    load_collection,
    raster,
    render_tile,
    rle_to_mask,
    tile_stem,
)
from segcore.annotations.issues import Notes
from segcore.errors import InvalidParameterError, InvalidTileError

REPO = Path(__file__).resolve().parents[3]
CLASSES = ["background", "tumor", "stroma"]


# --------------------------------------------------------------------------- helpers


def grid(*rows: str) -> np.ndarray:
    """A hand-written mask: one string per row, digits are classes, 'x' is 255."""
    return np.array([[255 if ch == "x" else int(ch) for ch in row] for row in rows], dtype=np.uint8)


def codes(result: Rendered | list[AnnotationIssue]) -> set[str]:
    issues = result.issues if isinstance(result, Rendered) else result
    return {issue.code for issue in issues}


def issue(result: Rendered | list[AnnotationIssue], code: str) -> AnnotationIssue:
    issues = result.issues if isinstance(result, Rendered) else result
    found = [i for i in issues if i.code == code]
    assert len(found) == 1, issues
    return found[0]


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict[str, Any] | None, cls: object = "tumor", **props: Any) -> dict[str, Any]:
    properties: dict[str, Any] = dict(props)
    if cls is not None:
        properties["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polygon(*rings: list[Any]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


def geojson(*features: dict[str, Any], size: int = 16, tile: str = "t1") -> Rendered:
    data = json.dumps({"type": "FeatureCollection", "features": list(features)}).encode()
    return render_tile("geojson", data, tile=tile, width=size, height=size, class_names=CLASSES)


def labeller(*labels: dict[str, Any], size: int = 16, tile: str = "t1") -> Rendered:
    data = json.dumps({"image_filename": f"{tile}.png", "labels": list(labels)}).encode()
    return render_tile("labeller", data, tile=tile, width=size, height=size, class_names=CLASSES)


def xy_points(ring: list[list[float]]) -> list[dict[str, float]]:
    return [{"x": x, "y": y} for x, y in ring]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def mask_to_runs(mask: np.ndarray) -> list[int]:
    """COCO run lengths of a binary mask: column by column, starting with a background run."""
    runs, current, count = [], False, 0
    for value in mask.T.reshape(-1).astype(bool).tolist():
        if value != current:
            runs.append(count)
            current, count = value, 0
        count += 1
    runs.append(count)
    return runs


def encode_rle_string(runs: list[int]) -> str:
    """pycocotools' rleToString, written independently of the decoder under test."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, like C's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
            if not more:
                break
    return "".join(out)


def reference_fill(rings: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Brute force even-odd test of every pixel centre, one edge at a time."""
    out = np.zeros((height, width), bool)
    for row in range(height):
        yc = row + 0.5
        for col in range(width):
            xc, parity = col + 0.5, False
            for ring in rings:
                for (x0, y0), (x1, y1) in zip(ring.tolist(), np.roll(ring, -1, axis=0).tolist(), strict=True):
                    if (y0 <= yc) != (y1 <= yc):  # the edge spans this row's centre line
                        t = (yc - y0) / (y1 - y0)
                        parity ^= x0 + t * (x1 - x0) <= xc
            out[row, col] = parity
    return out


# --------------------------------------------------------------------------- pixel convention


def test_square_on_pixel_edges_covers_exactly_the_pixels_inside() -> None:
    # Pillow's ImageDraw.polygon would fill 5x5 here (boundary pixels included).
    result = geojson(feature(polygon(rect(2, 2, 6, 6))), size=8)
    expected = grid(
        "00000000",
        "00000000",
        "00111100",
        "00111100",
        "00111100",
        "00111100",
        "00000000",
        "00000000",
    )
    np.testing.assert_array_equal(result.mask, expected)
    assert result.mask.dtype == np.uint8
    assert result.issues == []


def test_edges_through_pixel_centres_count_for_left_and_top_only() -> None:
    # Centres 1.5 (left/top edge) are in, centres 4.5 (right/bottom edge) are out.
    result = geojson(feature(polygon(rect(1.5, 1.5, 4.5, 4.5))), size=6)
    expected = grid("000000", "011100", "011100", "011100", "000000", "000000")
    np.testing.assert_array_equal(result.mask, expected)


def test_triangle_takes_pixels_whose_centre_is_strictly_left_of_the_hypotenuse() -> None:
    result = geojson(feature(polygon([[0, 0], [8, 0], [0, 8], [0, 0]])), size=8)
    expected = grid(
        "11111110",
        "11111100",
        "11111000",
        "11110000",
        "11100000",
        "11000000",
        "10000000",
        "00000000",
    )
    np.testing.assert_array_equal(result.mask, expected)


def test_shapes_sharing_an_edge_do_not_overlap() -> None:
    result = geojson(feature(polygon(rect(0, 0, 3.5, 4))), feature(polygon(rect(3.5, 0, 8, 4)), "stroma"), size=8)
    assert "OVERLAP" not in codes(result)
    # The shared edge x = 3.5 runs through pixel 3's centre: it is the right shape's left edge.
    assert (result.mask[:4, :3] == 1).all() and (result.mask[:4, 3:] == 2).all()


def test_fill_matches_a_brute_force_even_odd_reference() -> None:
    rng = np.random.default_rng(7)
    for case in range(25):
        rings = []
        for _ in range(int(rng.integers(1, 3))):
            points = rng.uniform(-3, 15, (int(rng.integers(3, 8)), 2))
            if case % 2:  # integer and half-integer vertices put edges exactly through centres
                points = np.round(points * 2) / 2
            rings.append(points)
        data = json.dumps([feature(polygon(*[r.tolist() for r in rings]))]).encode()
        result = render_tile("geojson", data, tile="fuzz", width=12, height=12, class_names=CLASSES)
        expected = reference_fill(rings, 12, 12).astype(np.uint8)
        np.testing.assert_array_equal(result.mask, expected, err_msg=f"case {case}: {rings}")


# --------------------------------------------------------------------------- GeoJSON


def test_geojson_polygon_with_hole() -> None:
    result = geojson(feature(polygon(rect(1, 1, 9, 9), rect(3, 3, 7, 7))), size=10)
    expected = grid(
        "0000000000",
        "0111111110",
        "0111111110",
        "0110000110",
        "0110000110",
        "0110000110",
        "0110000110",
        "0111111110",
        "0111111110",
        "0000000000",
    )
    np.testing.assert_array_equal(result.mask, expected)
    assert result.issues == []


def test_geojson_multipolygon_unites_polygons_each_with_its_holes() -> None:
    multi = {
        "type": "MultiPolygon",
        "coordinates": [[rect(0, 0, 4, 4), rect(1, 1, 3, 3)], [rect(5, 5, 8, 8)]],
    }
    result = geojson(feature(multi, "stroma"), size=8)
    expected = grid(
        "22220000",
        "20020000",
        "20020000",
        "22220000",
        "00000000",
        "00000222",
        "00000222",
        "00000222",
    )
    np.testing.assert_array_equal(result.mask, expected)


@pytest.mark.parametrize(
    "properties",
    [
        {"classification": {"name": "stroma", "colorRGB": -1}},  # QuPath >= 0.2
        {"classification": "stroma"},
        {"class": "stroma", "name": "my annotation"},
        {"name": "stroma"},
    ],
)
def test_geojson_class_sources(properties: dict[str, Any]) -> None:
    data = json.dumps({"type": "Feature", "geometry": polygon(rect(0, 0, 2, 2)), "properties": properties}).encode()
    result = render_tile("geojson", data, tile="t1", width=4, height=4, class_names=CLASSES)
    np.testing.assert_array_equal(result.mask, grid("2200", "2200", "0000", "0000"))


def test_geojson_accepts_collection_single_feature_and_bare_list() -> None:
    f = feature(polygon(rect(0, 0, 2, 2)))
    docs = [{"type": "FeatureCollection", "features": [f]}, f, [f]]
    masks = [
        render_tile("geojson", json.dumps(d).encode(), tile="t", width=4, height=4, class_names=CLASSES).mask
        for d in docs
    ]
    for mask in masks:
        np.testing.assert_array_equal(mask, grid("1100", "1100", "0000", "0000"))


def test_geojson_skips_unclassified_and_non_polygon_features_with_warnings() -> None:
    result = geojson(
        feature(polygon(rect(0, 0, 2, 2)), None),
        feature({"type": "Point", "coordinates": [5, 5]}),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        feature(polygon(rect(4, 4, 6, 6))),
        size=8,
    )
    assert result.mask[:2, :2].sum() == 0 and (result.mask[4:6, 4:6] == 1).all()
    assert codes(result) == {"UNCLASSIFIED", "UNSUPPORTED_GEOMETRY"}
    assert all(i.severity == WARNING and i.tile == "t1" for i in result.issues)
    assert "features[0]" in issue(result, "UNCLASSIFIED").message
    unsupported = sorted(i.message for i in result.issues if i.code == "UNSUPPORTED_GEOMETRY")
    assert unsupported == [
        "features[1]: is a Point, which has no area; skipped",
        "features[2]: is a LineString, which has no area; skipped",
    ]


def test_geojson_unknown_class_is_an_error_naming_class_tile_and_feature() -> None:
    result = geojson(feature(polygon(rect(0, 0, 2, 2))), feature(polygon(rect(3, 3, 5, 5)), "Necrosis"), tile="s1_t4")
    found = issue(result, "UNKNOWN_CLASS")
    assert found.severity == ERROR and found.tile == "s1_t4"
    assert "'Necrosis'" in found.message and "features[1]" in found.message
    assert result.has_errors
    assert result.mask[3:5, 3:5].sum() == 0  # nothing painted for it


def test_geojson_degenerate_polygons_are_skipped_with_a_warning() -> None:
    result = geojson(
        feature(polygon([[1, 1], [5, 1], [1, 1]])),  # two distinct points
        feature(polygon([[0, 0], [2, 2], [4, 4], [0, 0]])),  # collinear: zero area
        feature(polygon(rect(0, 0, 2, 2), [[1, 1], [1, 1], [1, 1]])),  # degenerate hole only
    )
    found = issue(result, "DEGENERATE_POLYGON")
    assert found.severity == WARNING and found.tile == "t1"
    assert "features[0]" in found.message and "features[1]" in found.message and "features[2] ring 1" in found.message
    assert result.mask.sum() == 4  # the third feature's outline still renders


def test_degenerate_outline_drops_its_holes_but_a_degenerate_labeller_region_does_not() -> None:
    # GeoJSON: without its outline, a hole would be filled by the even-odd rule; drop the polygon.
    result = geojson(feature(polygon([[0, 0], [4, 0], [0, 0]], rect(1, 1, 3, 3))), size=4)
    assert (result.mask == 0).all() and "features[0] ring 0" in issue(result, "DEGENERATE_POLYGON").message
    # Django-Labeller regions are equal partners: the others still render.
    regions = [xy_points([[0, 0], [4, 0], [0, 0]]), xy_points(rect(1, 1, 3, 3)[:-1])]
    result = labeller({"label_type": "polygon", "label_class": "tumor", "regions": regions}, size=4)
    np.testing.assert_array_equal(result.mask, grid("0000", "0110", "0110", "0000"))
    assert "labels[0] ring 0" in issue(result, "DEGENERATE_POLYGON").message


def test_geojson_bow_tie_is_not_degenerate() -> None:
    # Signed area 0, but two triangles under the even-odd rule.
    result = geojson(feature(polygon([[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]])), size=4)
    assert "DEGENERATE_POLYGON" not in codes(result)
    assert result.mask.sum() > 0


def test_geojson_out_of_bounds_shapes_are_clipped_with_one_warning() -> None:
    result = geojson(
        feature(polygon(rect(-3, -3, 2, 2))),
        feature(polygon(rect(3, 3, 9, 5))),
        feature(polygon(rect(1, 4, 2, 5))),
        size=6,
    )
    expected = grid("110000", "110000", "000000", "000111", "010111", "000000")
    np.testing.assert_array_equal(result.mask, expected)
    found = issue(result, "OUT_OF_BOUNDS")
    assert found.severity == WARNING and "features[0]" in found.message and "features[1]" in found.message
    assert "features[2]" not in found.message


def test_overlapping_classes_later_wins_and_one_warning_per_tile() -> None:
    result = geojson(
        feature(polygon(rect(0, 0, 4, 4))),
        feature(polygon(rect(2, 2, 6, 6)), "stroma"),
        feature(polygon(rect(3, 0, 5, 2)), "stroma"),
        feature(polygon(rect(0, 3, 1, 4)), "background"),
        size=6,
    )
    expected = grid("111220", "111220", "112222", "012222", "002222", "002222")
    np.testing.assert_array_equal(result.mask, expected)
    found = issue(result, "OVERLAP")
    assert found.severity == WARNING and "features[1]" in found.message and "'tumor'" in found.message


def test_same_class_overlap_is_not_reported() -> None:
    result = geojson(feature(polygon(rect(0, 0, 4, 4))), feature(polygon(rect(2, 2, 6, 6))))
    assert "OVERLAP" not in codes(result)


def test_empty_geojson_warns_no_annotations() -> None:
    result = geojson(size=4)
    assert (result.mask == 0).all()
    found = issue(result, "NO_ANNOTATIONS")
    assert found.severity == WARNING and found.tile == "t1"


@pytest.mark.parametrize("data", [b"{not json", b"", b'{"type": "Polygon"}', b"\xff\xfe\x00garbage", b"42"])
def test_geojson_undecodable_bytes_raise_naming_the_tile(data: bytes) -> None:
    with pytest.raises(InvalidTileError) as info:
        render_tile("geojson", data, tile="bad_tile", width=4, height=4, class_names=CLASSES)
    assert info.value.tile == "bad_tile"


def test_geojson_bad_coordinates_are_an_error_not_an_exception() -> None:
    result = geojson(feature(polygon([["a", 1], [2, 2], [3, 0]])), feature(polygon(rect(0, 0, 1, 1))))
    found = issue(result, "BAD_FORMAT")
    assert found.severity == ERROR and "features[0]" in found.message
    assert result.mask[0, 0] == 1


# --------------------------------------------------------------------------- Django-Labeller


def test_labeller_polygon_regions_use_even_odd_box_and_group() -> None:
    result = labeller(
        {
            "label_type": "polygon",
            "label_class": "tumor",
            "object_id": "a",
            "regions": [xy_points(rect(0, 0, 6, 6)[:-1]), xy_points(rect(2, 2, 4, 4)[:-1])],
        },
        {"label_type": "box", "label_class": "stroma", "centre": {"x": 9, "y": 2}, "size": {"x": 4, "y": 2}},
        {
            "label_type": "group",
            "label_class": "stroma",  # a classified group paints its members in its class
            "component_models": [
                {"label_type": "polygon", "label_class": "tumor", "regions": [xy_points(rect(0, 7, 2, 9))]},
                {"label_type": "box", "label_class": None, "centre": {"x": 5, "y": 8}, "size": {"x": 2, "y": 2}},
            ],
        },
        {
            "label_type": "group",
            "label_class": None,  # an unclassified group keeps its members' classes
            "component_models": [
                {"label_type": "polygon", "label_class": "tumor", "vertices": xy_points(rect(8, 6, 10, 8))},
            ],
        },
        size=12,
    )
    expected = grid(
        "111111000000",
        "111111022220",
        "110011022220",
        "110011000000",
        "111111000000",
        "111111000000",
        "000000001100",
        "220022001100",
        "220022000000",
        "000000000000",
        "000000000000",
        "000000000000",
    )
    np.testing.assert_array_equal(result.mask, expected)
    assert result.issues == []


def test_labeller_points_unclassified_unknown_and_bare_list() -> None:
    labels = [
        {"label_type": "point", "label_class": "tumor", "position": {"x": 1, "y": 1}},
        {"label_type": "box", "label_class": None, "centre": {"x": 2, "y": 2}, "size": {"x": 2, "y": 2}},
        {"label_type": "box", "label_class": "", "centre": {"x": 2, "y": 2}, "size": {"x": 2, "y": 2}},
        {"label_type": "box", "label_class": "vessel", "centre": {"x": 2, "y": 2}, "size": {"x": 2, "y": 2}},
        {"label_type": "group", "label_class": None, "component_models": [{"label_type": "point"}]},
        {"label_type": "composite", "label_class": "tumor", "components": ["a"]},
    ]
    result = render_tile("labeller", json.dumps(labels).encode(), tile="L7", width=4, height=4, class_names=CLASSES)
    assert (result.mask == 0).all()
    assert codes(result) == {"UNSUPPORTED_GEOMETRY", "UNCLASSIFIED", "UNKNOWN_CLASS"}
    assert all(i.tile == "L7" for i in result.issues)
    assert "labels[4].component_models[0]" in issue(result, "UNSUPPORTED_GEOMETRY").message
    assert "labels[1]" in issue(result, "UNCLASSIFIED").message and "labels[2]" in issue(result, "UNCLASSIFIED").message
    unknown = issue(result, "UNKNOWN_CLASS")
    assert unknown.severity == ERROR and "'vessel'" in unknown.message and "labels[3]" in unknown.message


def test_labeller_oriented_ellipse_renders_a_disc() -> None:
    ellipse = {
        "label_type": "oriented_ellipse",
        "label_class": "tumor",
        "centre": {"x": 8, "y": 8},
        "radius1": 5,
        "radius2": 5,
        "orientation_radians": 0.3,
    }
    result = labeller(ellipse)
    yy, xx = np.mgrid[:16, :16] + 0.5
    disc = (xx - 8) ** 2 + (yy - 8) ** 2 < 4.8**2
    ring = (xx - 8) ** 2 + (yy - 8) ** 2 < 5.2**2
    assert (result.mask[disc] == 1).all() and (result.mask[~ring] == 0).all()


def test_labeller_unknown_label_type_is_an_error_and_bad_structure_raises() -> None:
    result = labeller({"label_type": "spline", "label_class": "tumor"})
    assert issue(result, "BAD_FORMAT").severity == ERROR
    with pytest.raises(InvalidTileError) as info:
        render_tile("labeller", b'{"labels": 3}', tile="L1", width=4, height=4, class_names=CLASSES)
    assert info.value.tile == "L1"


# --------------------------------------------------------------------------- COCO


def coco_doc(annotations: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {
        "images": [
            {"id": 1, "file_name": "slide/tile_a.png", "width": 8, "height": 8},
            {"id": 2, "file_name": "C:\\export\\tile_b.tif", "width": 8, "height": 8},
            {"id": 3, "file_name": "tile_c.png", "width": 8, "height": 8},
        ],
        "categories": [{"id": 7, "name": "tumor"}, {"id": 9, "name": "stroma"}, {"id": 11, "name": "cat"}],
        "annotations": annotations,
    }
    doc.update(extra)
    return json.dumps(doc).encode()


def test_coco_polygons_of_one_annotation_are_united_and_tiles_match_by_stem() -> None:
    data = coco_doc(
        [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                # Overlapping polygons of one object are united (an even-odd XOR would punch out [1, 2]^2).
                "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3], [5, 5, 7, 5, 7, 7], [1, 1, 2, 1, 2, 2, 1, 2]],
            },
            {"id": 2, "image_id": 2, "category_id": 9, "segmentation": [[1, 1, 2, 1, 2, 2, 1, 2]], "iscrowd": 0},
        ]
    )
    collection = load_collection("coco", data, CLASSES)
    assert collection.issues == [] and collection.tiles == ["tile_a", "tile_b", "tile_c"]
    a = collection.render(tile="tile_a", width=8, height=8)
    expected = grid(
        "11100000",
        "11100000",
        "11100000",
        "00000000",
        "00000000",
        "00000110",
        "00000010",
        "00000000",
    )
    np.testing.assert_array_equal(a.mask, expected)
    assert a.issues == []
    b = collection.render(tile="tile_b", width=8, height=8)
    assert b.mask[1, 1] == 2 and b.mask.sum() == 2
    c = collection.render(tile="tile_c", width=8, height=8)  # listed, no annotations: background
    assert (c.mask == 0).all() and codes(c) == {"NO_ANNOTATIONS"}


def test_coco_uncompressed_rle_is_column_major() -> None:
    runs = [3, 2, 4, 1, 6]  # 4x4: pixels 3-4 and 9 in column-major order are foreground
    expected = grid("0100", "0010", "0000", "1000")
    np.testing.assert_array_equal(rle_to_mask(runs, 4, 4).astype(np.uint8), expected)
    doc = {
        "images": [{"id": 1, "file_name": "t.png", "width": 4, "height": 4}],
        "categories": [{"id": 1, "name": "stroma"}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": {"size": [4, 4], "counts": runs}}
        ],
    }
    result = load_collection("coco", json.dumps(doc).encode(), CLASSES).render(tile="t", width=4, height=4)
    np.testing.assert_array_equal(result.mask, expected * 2)


def test_coco_compressed_rle_hand_computed() -> None:
    # [3, 2, 4, 1, 6]: the 4th run is stored as 1 - 2 = -1 -> group 0b11111 (sign bit set) -> 'O';
    # the 5th as 6 - 4 = 2 -> '2'. 40 needs two groups: 8 | more -> 'X', then 1 -> '1'.
    assert decode_rle_string("324O2") == [3, 2, 4, 1, 6]
    assert decode_rle_string("X126") == [40, 2, 6]
    assert encode_rle_string([3, 2, 4, 1, 6]) == "324O2"  # the test encoder agrees with the hand values
    assert encode_rle_string([40, 2, 6]) == "X126"
    doc = {
        "images": [{"id": 1, "file_name": "t.png", "width": 4, "height": 4}],
        "categories": [{"id": 1, "name": "tumor"}],
        "annotations": [{"image_id": 1, "category_id": 1, "segmentation": {"size": [4, 4], "counts": "324O2"}}],
    }
    result = load_collection("coco", json.dumps(doc).encode(), CLASSES).render(tile="t", width=4, height=4)
    np.testing.assert_array_equal(result.mask, grid("0100", "0010", "0000", "1000"))


def test_coco_compressed_rle_round_trips_random_masks() -> None:
    rng = np.random.default_rng(3)
    for height, width in [(1, 1), (5, 7), (16, 16), (31, 9), (64, 80)]:
        for density in (0.0, 0.1, 0.5, 0.95, 1.0):
            mask = rng.random((height, width)) < density
            runs = mask_to_runs(mask)
            assert decode_rle_string(encode_rle_string(runs)) == runs
            np.testing.assert_array_equal(rle_to_mask(runs, height, width), mask)
    # Long runs exercise multi-group values and large negative differences.
    mask = np.zeros((300, 200), bool)
    mask[10:250, 5:150] = True
    mask[0, 199] = True
    runs = mask_to_runs(mask)
    np.testing.assert_array_equal(rle_to_mask(decode_rle_string(encode_rle_string(runs)), 300, 200), mask)


def test_coco_unknown_category_names_it_and_the_tile() -> None:
    data = coco_doc(
        [
            {"id": 4, "image_id": 1, "category_id": 11, "segmentation": [[0, 0, 2, 0, 2, 2]]},
            {"id": 5, "image_id": 2, "category_id": 7, "segmentation": [[0, 0, 2, 0, 2, 2]]},
        ]
    )
    collection = load_collection("coco", data, CLASSES)
    bad = collection.render(tile="tile_a", width=8, height=8)
    found = issue(bad, "UNKNOWN_CLASS")
    assert found.severity == ERROR and found.tile == "tile_a"
    assert "'cat'" in found.message and "annotations[0] (id 4)" in found.message
    assert not collection.render(tile="tile_b", width=8, height=8).has_errors


def test_coco_size_mismatches() -> None:
    data = coco_doc(
        [
            {"image_id": 1, "category_id": 7, "segmentation": {"size": [8, 8], "counts": [64]}},
            {"image_id": 2, "category_id": 7, "segmentation": {"size": [4, 16], "counts": [64]}},
        ]
    )
    collection = load_collection("coco", data, CLASSES)
    wrong_tile = collection.render(tile="tile_a", width=10, height=8)
    messages = sorted(i.message for i in wrong_tile.issues if i.code == "SIZE_MISMATCH" and i.severity == ERROR)
    assert messages == [
        "annotations[0]: RLE size is 8x8 (width x height) but the tile is 10x8",
        "the annotation file gives 'slide/tile_a.png' as 8x8 pixels but the tile is 10x8",
    ]
    assert wrong_tile.mask.shape == (8, 10)
    wrong_rle = collection.render(tile="tile_b", width=8, height=8)
    found = issue(wrong_rle, "SIZE_MISMATCH")
    assert found.tile == "tile_b" and "annotations[1]" in found.message and "16x4" in found.message


def test_coco_bad_rle_and_missing_segmentation() -> None:
    data = coco_doc(
        [
            {"image_id": 1, "category_id": 7, "segmentation": {"size": [8, 8], "counts": [10, 5]}},
            {"image_id": 1, "category_id": 7, "segmentation": {"size": [8, 8], "counts": "3 !"}},
            {"image_id": 1, "category_id": 99, "segmentation": [[0, 0, 2, 0, 2, 2]]},
            {"image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2], "segmentation": []},
            {"image_id": 1, "category_id": 7, "segmentation": [[0, 0, 2, 0]]},
        ]
    )
    result = load_collection("coco", data, CLASSES).render(tile="tile_a", width=8, height=8)
    bad = issue(result, "BAD_FORMAT") if len([i for i in result.issues if i.code == "BAD_FORMAT"]) == 1 else None
    messages = " | ".join(i.message for i in result.issues if i.code == "BAD_FORMAT")
    assert bad is None  # three different problems: three merged issues
    assert "add up to 15" in messages and "' '" in messages and "category_id 99" in messages
    assert "annotations[3]" in issue(result, "UNSUPPORTED_GEOMETRY").message
    assert "annotations[4]" in issue(result, "DEGENERATE_POLYGON").message


def test_coco_unlisted_tiles_unmatched_images_and_orphan_annotations() -> None:
    data = coco_doc(
        [
            {"image_id": 1, "category_id": 7, "segmentation": [[0, 0, 2, 0, 2, 2]]},
            {"image_id": 2, "category_id": 7, "segmentation": [[0, 0, 2, 0, 2, 2]]},
            {"id": 77, "image_id": 42, "category_id": 7, "segmentation": [[0, 0, 2, 0, 2, 2]]},
        ]
    )
    collection = load_collection("coco", data, CLASSES)
    orphan = issue(collection.issues, "UNMATCHED_ANNOTATION")
    assert orphan.tile == "" and orphan.severity == WARNING and "annotations[2] (id 77)" in orphan.message
    missing = collection.render(tile="tile_z", width=8, height=8)
    assert (missing.mask == 255).all() and codes(missing) == {"NOT_ANNOTATED"}
    assert missing.issues[0].tile == "tile_z"
    unmatched = collection.unmatched(["tile_a", "tile_z"])  # tile_c has no annotations: not reported
    assert [(i.code, i.tile, i.severity) for i in unmatched] == [("UNMATCHED_ANNOTATION", "tile_b", WARNING)]
    assert "C:\\\\export\\\\tile_b.tif" in unmatched[0].message or "tile_b.tif" in unmatched[0].message


def test_coco_file_level_problems() -> None:
    data = json.dumps(
        {
            "images": [{"id": 1, "file_name": "a/t.png"}, {"id": 2, "file_name": "b/t.png"}, {"file_name": "x.png"}],
            "categories": [{"id": 1}],
            "annotations": [],
        }
    ).encode()
    collection = load_collection("coco", data, CLASSES)
    assert codes(collection.issues) == {"BAD_FORMAT"}
    text = " | ".join(i.message for i in collection.issues)
    assert "'b/t.png' has the same tile name as 'a/t.png'" in text and "images[2]" in text and "categories[0]" in text
    assert all(i.tile == "" and i.severity == ERROR for i in collection.issues)


@pytest.mark.parametrize("data", [b"nope", b"[]", b'{"images": [], "annotations": []}', b""])
def test_broken_coco_file_raises_invalid_parameter(data: bytes) -> None:
    with pytest.raises(InvalidParameterError) as info:
        load_collection("coco", data, CLASSES)
    assert info.value.field == "annotations"


# --------------------------------------------------------------------------- GeoJSON collection


def test_geojson_collection_matches_features_to_tiles_by_stem() -> None:
    features = [
        feature(polygon(rect(0, 0, 2, 2)), image="project/tile_a.png"),
        feature(polygon(rect(2, 2, 4, 4)), "stroma", tile="tile_b"),
        feature(polygon(rect(0, 0, 1, 1)), "Necrosis", image_name="tile_b.tiff"),
        feature(polygon(rect(0, 0, 1, 1)), image="elsewhere.png"),
    ]
    collection = load_collection(
        "geojson", json.dumps({"type": "FeatureCollection", "features": features}).encode(), CLASSES
    )
    assert collection.issues == [] and collection.tiles == ["elsewhere", "tile_a", "tile_b"]
    a = collection.render(tile="tile_a", width=4, height=4)
    np.testing.assert_array_equal(a.mask, grid("1100", "1100", "0000", "0000"))
    b = collection.render(tile="tile_b", width=4, height=4)
    np.testing.assert_array_equal(b.mask, grid("0000", "0000", "0022", "0022"))
    assert "features[2]" in issue(b, "UNKNOWN_CLASS").message and issue(b, "UNKNOWN_CLASS").tile == "tile_b"
    empty = collection.render(tile="tile_c", width=4, height=4)
    assert (empty.mask == 0).all() and codes(empty) == {"NO_ANNOTATIONS"}
    assert [i.tile for i in collection.unmatched(["tile_a", "tile_b", "tile_c"])] == ["elsewhere"]


def test_geojson_collection_features_without_a_tile() -> None:
    named = feature(polygon(rect(0, 0, 2, 2)), image="t.png")
    unnamed = feature(polygon(rect(0, 0, 2, 2)))
    collection = load_collection("geojson", json.dumps([named, unnamed]).encode(), CLASSES)
    found = issue(collection.issues, "BAD_FORMAT")
    assert found.severity == ERROR and found.tile == "" and "features[1]" in found.message
    with pytest.raises(InvalidParameterError):
        load_collection("geojson", json.dumps([unnamed]).encode(), CLASSES)


# --------------------------------------------------------------------------- class-index masks


def test_class_mask_png_and_tiff_keep_indices_and_unlabelled() -> None:
    arr = grid("0125", "x210", "0000", "2222")
    arr[0, 3] = 2
    for data in (png(arr), tiff(arr), tiff(arr.astype(np.uint16)), png(arr.astype(np.uint16))):
        result = render_tile("masks", data, tile="m1", width=4, height=4, class_names=CLASSES)
        np.testing.assert_array_equal(result.mask, arr)
        assert result.mask.dtype == np.uint8 and result.issues == []


def test_class_mask_palette_and_equal_rgb_accepted_colour_rejected() -> None:
    arr = grid("0120", "0000", "2110", "0000")
    palette = Image.frombytes("P", (4, 4), arr.tobytes())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    for data in (buf.getvalue(), png(np.repeat(arr[:, :, None], 3, axis=2))):
        result = render_tile("masks", data, tile="m1", width=4, height=4, class_names=CLASSES)
        np.testing.assert_array_equal(result.mask, arr)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    result = render_tile("masks", png(colour), tile="m2", width=4, height=4, class_names=CLASSES)
    assert issue(result, "BAD_FORMAT").tile == "m2" and result.has_errors


def test_class_mask_bad_indices_are_named_and_unlabelled() -> None:
    arr = np.array([[0, 1, 300], [3, 255, 2]], np.uint16)
    result = render_tile("masks", png(arr), tile="m3", width=3, height=2, class_names=CLASSES)
    found = issue(result, "BAD_CLASS_INDEX")
    assert found.severity == ERROR and found.tile == "m3" and "3, 300" in found.message
    np.testing.assert_array_equal(result.mask, grid("01x", "xx2"))


def test_class_mask_size_mismatch_and_no_foreground() -> None:
    result = render_tile("masks", png(np.zeros((4, 5), np.uint8)), tile="m4", width=4, height=4, class_names=CLASSES)
    assert issue(result, "SIZE_MISMATCH").tile == "m4" and "5x4" in issue(result, "SIZE_MISMATCH").message
    assert result.mask.shape == (4, 4) and (result.mask == 255).all()
    empty = render_tile("masks", png(np.zeros((4, 4), np.uint8)), tile="m5", width=4, height=4, class_names=CLASSES)
    assert codes(empty) == {"NO_ANNOTATIONS"}


@pytest.mark.parametrize("fmt", ["masks", "instance-masks"])
@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n garbage", b"II*\x00 broken tiff", b"", b"hello"])
def test_corrupt_mask_bytes_raise_naming_the_tile(fmt: str, data: bytes) -> None:
    with pytest.raises(InvalidTileError) as info:
        render_tile(fmt, data, tile="corrupt_7", width=4, height=4, class_names=CLASSES)
    assert info.value.tile == "corrupt_7"


def test_truncated_png_raises() -> None:
    data = png(np.arange(64, dtype=np.uint8).reshape(8, 8) % 3)
    with pytest.raises(InvalidTileError):
        render_tile("masks", data[: len(data) // 2], tile="half", width=8, height=8, class_names=CLASSES)


# --------------------------------------------------------------------------- instance masks


def test_instance_masks_8_16_and_32_bit_become_one_class() -> None:
    labels8 = np.array([[0, 1, 2], [7, 0, 255]], np.uint8)
    labels16 = np.array([[0, 300, 1000], [65535, 0, 2]], np.uint16)
    labels32 = np.array([[0, 70000, 1], [5, 0, 123456]], np.uint32)
    expected = grid("022", "202")
    for data in (png(labels8), png(labels16), tiff(labels16), tiff(labels32)):
        result = render_tile(
            "instance-masks", data, tile="i1", width=3, height=2, class_names=CLASSES, instance_class=2
        )
        np.testing.assert_array_equal(result.mask, expected)
        assert result.issues == []


def test_instance_masks_colour_coded_and_checks() -> None:
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 1] = (10, 200, 30)
    result = render_tile("instance-masks", png(colour), tile="i2", width=2, height=2, class_names=CLASSES)
    np.testing.assert_array_equal(result.mask, grid("01", "00"))
    mismatch = render_tile("instance-masks", png(colour), tile="i3", width=3, height=2, class_names=CLASSES)
    assert issue(mismatch, "SIZE_MISMATCH").tile == "i3"
    for bad in (0, 3, -1):
        with pytest.raises(InvalidParameterError) as info:
            render_tile(
                "instance-masks", png(colour), tile="i", width=2, height=2, class_names=CLASSES, instance_class=bad
            )
        assert info.value.field == "instance_class"


# --------------------------------------------------------------------------- shared rules


@pytest.mark.parametrize("fmt", ["masks", "instance-masks", "geojson", "labeller"])
def test_missing_annotation_leaves_the_tile_unlabelled(fmt: str) -> None:
    result = render_tile(fmt, None, tile="lonely", width=3, height=2, class_names=CLASSES)
    assert result.mask.shape == (2, 3) and (result.mask == 255).all()
    assert [(i.code, i.tile, i.severity) for i in result.issues] == [("NOT_ANNOTATED", "lonely", WARNING)]


def test_bad_parameters() -> None:
    with pytest.raises(InvalidParameterError, match="load_collection"):
        render_tile("coco", b"{}", tile="t", width=4, height=4, class_names=CLASSES)
    with pytest.raises(InvalidParameterError):
        render_tile("svg", b"{}", tile="t", width=4, height=4, class_names=CLASSES)
    with pytest.raises(InvalidParameterError):
        load_collection("labeller", b"{}", CLASSES)
    with pytest.raises(InvalidParameterError):
        render_tile("geojson", b"[]", tile="t", width=0, height=4, class_names=CLASSES)
    for names in ([], ["a", "a"], ["a", ""], [f"c{i}" for i in range(256)]):
        with pytest.raises(InvalidParameterError) as info:
            render_tile("geojson", b"[]", tile="t", width=4, height=4, class_names=names)
        assert info.value.field == "class_names"


def test_many_problems_of_one_kind_merge_into_one_issue() -> None:
    features = [feature(polygon([[i, 0], [i, 0], [i, 0]])) for i in range(20)]
    result = geojson(*features)
    found = issue(result, "DEGENERATE_POLYGON")
    assert "features[0]" in found.message and "and 12 more" in found.message


def test_tile_stem() -> None:
    assert tile_stem("a/b/tile_1.png") == "tile_1"
    assert tile_stem("C:\\data\\tile_2.tif") == "tile_2"
    assert tile_stem("tile_3") == "tile_3"


def zigzag(vertices: int, size: int) -> list[list[float]]:
    """A ring whose every edge crosses the whole tile top to bottom: a few KB of JSON that
    rasterises to vertices x size crossings."""
    return [[i * size / vertices, 0.5 if i % 2 else size - 0.5] for i in range(vertices)]


@pytest.mark.parametrize(("vertices", "size", "limit"), [
    (100_000, 1024, "vertices per shape"),  # the reproduced attack: ~20 GB before the limits
    (40_000, 1024, "pixel rows per pixel"),  # under the vertex limit, over the crossing budget
])
def test_a_zigzag_polygon_is_refused_before_rasterising_it(vertices: int, size: int, limit: str) -> None:
    tracemalloc.start()
    try:
        rendered = geojson(feature(polygon(zigzag(vertices, size))), size=size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    too_complex = [i for i in rendered.issues if i.code == "TOO_COMPLEX"]
    assert too_complex and too_complex[0].severity == "error", rendered.issues
    assert limit in too_complex[0].message or "vertices" in too_complex[0].message
    assert peak < 150 * 2**20, f"refusing it took {peak / 2**20:.0f} MiB"


def test_many_shapes_of_one_tile_share_its_crossing_budget() -> None:
    # Each shape alone is affordable; together they would cost 32 crossings per pixel.
    shapes = [feature(polygon(zigzag(64, 64))) for _ in range(40)]
    rendered = geojson(*shapes, size=64)
    assert [i.code for i in rendered.issues if i.severity == "error"] == ["TOO_COMPLEX"]
    assert "features[" in rendered.issues[0].message


def test_chunked_rasterisation_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    rings = [rng.uniform(-5, 69, size=(n, 2)) for n in (3, 17, 200)]
    whole = raster.rasterise(rings, 64, 64)
    monkeypatch.setattr(raster, "_CHUNK", 7)
    chunked = raster.rasterise(rings, 64, 64)
    assert whole is not None and chunked is not None
    assert whole[:2] == chunked[:2] and np.array_equal(whole[2], chunked[2])
    assert raster.row_crossings(rings, 64, 64) > 7 * 10  # many chunks were used


def test_every_issue_code_is_produced_by_some_input() -> None:
    # The codes the module documents; each test above crafts the input for one of them.
    produced: set[str] = set()
    produced |= codes(geojson(feature(polygon(rect(-1, 0, 2, 2))), feature(polygon(rect(0, 0, 1, 1)), "stroma")))
    produced |= codes(geojson(feature(polygon(rect(0, 0, 1, 1)), "x"), feature(None), feature(polygon([]))))
    produced |= codes(geojson(feature(polygon(rect(0, 0, 1, 1)), None), feature(polygon([[0, 0], [1, "a"]]))))
    produced |= codes(geojson())
    produced |= codes(
        render_tile("masks", png(np.full((2, 2), 9, np.uint8)), tile="t", width=2, height=3, class_names=CLASSES)
    )
    produced |= codes(
        render_tile("masks", png(np.full((2, 2), 9, np.uint8)), tile="t", width=2, height=2, class_names=CLASSES)
    )
    produced |= codes(render_tile("masks", None, tile="t", width=2, height=2, class_names=CLASSES))
    coco = load_collection(
        "coco", coco_doc([{"image_id": 1, "category_id": 7, "segmentation": [[0, 0, 1, 0, 1, 1]]}]), CLASSES
    )
    produced |= codes(coco.unmatched([]))
    produced |= codes(geojson(feature(polygon(zigzag(2_000, 64))), size=64))
    assert produced == {
        "TOO_COMPLEX",
        "OUT_OF_BOUNDS",
        "OVERLAP",
        "UNKNOWN_CLASS",
        "UNSUPPORTED_GEOMETRY",
        "DEGENERATE_POLYGON",
        "UNCLASSIFIED",
        "BAD_FORMAT",
        "NO_ANNOTATIONS",
        "SIZE_MISMATCH",
        "BAD_CLASS_INDEX",
        "NOT_ANNOTATED",
        "UNMATCHED_ANNOTATION",
    }


def test_annotations_module_does_not_import_torch() -> None:
    code = "import sys, segcore.annotations; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_compressed_rle_decoding_is_linear_and_bounded() -> None:
    # One number of a million continuation groups was a quadratic big-integer build, then an
    # OverflowError surfacing as INTERNAL.
    with pytest.raises(ValueError, match="longer than any run length"):
        decode_rle_string("o" * 1_000_000)
    with pytest.raises(ValueError, match="more than 4 runs"):
        decode_rle_string("0" * 5, most=4)
    with pytest.raises(ValueError, match="longer than 4 runs can be"):
        decode_rle_string("0" * 29, most=4)
    with pytest.raises(ValueError, match="runs for 4 pixels"):
        rle_to_mask([0] * 6, 2, 2)
    with pytest.raises(ValueError, match="must be numbers"):  # was an OverflowError
        rle_to_mask([10**400, 1], 2, 2)


def test_a_huge_rle_in_a_coco_file_is_a_bad_format_issue_not_an_error() -> None:
    doc = coco_doc([{"image_id": 1, "category_id": 7,
                     "segmentation": {"size": [8, 8], "counts": "o" * 100_000}}])
    issues = load_collection("coco", doc, CLASSES).render(tile="tile_a", width=8, height=8).issues
    assert [i.code for i in issues if i.severity == "error"] == ["BAD_FORMAT"]


def test_repeated_problems_merge_in_linear_time() -> None:
    notes = Notes("t")
    for i in range(200_000):  # one list scan per repeat was 200k x 200k
        notes.add("warning", "DEGENERATE_POLYGON", "skipped", f"features[{i}]")
    (issue,) = notes.issues()
    assert issue.message.startswith("features[0], features[1]") and "and 199992 more: skipped" in issue.message


def test_deep_json_nesting_is_refused_naming_the_tile() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # a RecursionError (INTERNAL) before the limit
    shallow_enough = json.dumps({"type": "FeatureCollection", "features": [[[[[[[[[]]]]]]]]]}).encode()
    for data in (deep, b"[" * 40 + b"]" * 40):
        with pytest.raises(InvalidTileError, match="nested more than 32 deep") as info:
            render_tile("geojson", data, tile="t9", width=4, height=4, class_names=CLASSES)
        assert info.value.tile == "t9"
    render_tile("geojson", shallow_enough, tile="t9", width=4, height=4, class_names=CLASSES)
    with pytest.raises(InvalidParameterError, match="nested more than 32 deep"):
        load_collection("coco", deep, CLASSES)


def test_coordinates_beyond_the_limit_are_refused() -> None:
    rendered = geojson(feature(polygon([[0, 0], [1e300, 0], [0, 1e300], [0, 0]])))
    assert [(i.code, i.severity) for i in rendered.issues] == [("BAD_FORMAT", "error")]
    assert "beyond ±1,000,000 pixels" in rendered.issues[0].message
