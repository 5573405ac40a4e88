"""Training sets from every annotation format, through the pipeline service: the stored masks are
the rendered annotations, warnings are kept in the report, fatal problems name the tile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client, TrainingSetFailedError
from services.common.storage import ObjectStore
from tests.helpers import png_bytes
from tests.integration.conftest import PipelineServer

CLASSES = ["background", "cell", "debris"]
SIZE = 32


def write_tiles(folder: Path, count: int = 4) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"t{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)))
    return [f"t{i}" for i in range(count)]


def square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def expected(cls: int, x0: int, y0: int, x1: int, y1: int, hole: tuple[int, int, int, int] | None = None) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0:y1, x0:x1] = cls
    if hole:
        hx0, hy0, hx1, hy1 = hole
        mask[hy0:hy1, hx0:hx1] = 0
    return mask


def stored_masks(client: Client, store: ObjectStore, ts: pb.TrainingSet) -> dict[str, np.ndarray]:
    full = client.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(name=ts.name))
    return {t.name: np.array(Image.open(io.BytesIO(store.get(t.mask_uri)))) for t in full.tiles}


def test_geojson_per_tile_with_a_hole(client: Client, store: ObjectStore, tmp_path: Path) -> None:
    stems = write_tiles(tmp_path / "tiles")
    ann = tmp_path / "ann"
    ann.mkdir()
    for stem in stems:
        feature = {"type": "Feature", "properties": {"classification": {"name": "cell"}},
                   "geometry": {"type": "Polygon", "coordinates": [square(4, 4, 28, 28), square(12, 12, 20, 20)]}}
        (ann / f"{stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    ts = client.create_training_set("geo", tmp_path / "tiles", ann, format="geojson", class_names=CLASSES)
    for mask in stored_masks(client, store, ts).values():
        np.testing.assert_array_equal(mask, expected(1, 4, 4, 28, 28, hole=(12, 12, 20, 20)))


def test_coco_file_with_polygons_and_rle(client: Client, store: ObjectStore, tmp_path: Path) -> None:
    stems = write_tiles(tmp_path / "tiles")
    rle = np.zeros((SIZE, SIZE), np.uint8)
    rle[0:4, 0:SIZE] = 1  # top 4 rows, encoded column-major below
    flat = rle.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    coco = {
        "images": [{"id": i, "file_name": f"{s}.png", "width": SIZE, "height": SIZE} for i, s in enumerate(stems)],
        "categories": [{"id": 7, "name": "cell"}, {"id": 9, "name": "debris"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 7, "segmentation": [[8, 8, 24, 8, 24, 24, 8, 24]]},
            {"id": 2, "image_id": 1, "category_id": 9, "segmentation": {"size": [SIZE, SIZE], "counts": counts}},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ts = client.create_training_set("coco", tmp_path / "tiles", tmp_path / "coco.json", format="coco",
                                    class_names=CLASSES)
    masks = stored_masks(client, store, ts)
    np.testing.assert_array_equal(masks["t0"], expected(1, 8, 8, 24, 24))
    np.testing.assert_array_equal(masks["t1"], rle * 2)
    codes = {(i.code, i.tile) for i in ts.report.issues}
    assert ("NO_ANNOTATIONS", "t2") in codes or ("NOT_ANNOTATED", "t2") in codes


def test_labeller_json_per_tile(client: Client, store: ObjectStore, tmp_path: Path) -> None:
    stems = write_tiles(tmp_path / "tiles")
    ann = tmp_path / "ann"
    ann.mkdir()
    for stem in stems:
        labels = {"image_filename": f"{stem}.png", "labels": [
            {"label_type": "polygon", "label_class": "debris", "object_id": 1,
             "regions": [[{"x": x, "y": y} for x, y in square(2, 2, 10, 10)[:-1]]]},
            {"label_type": "box", "label_class": "cell", "object_id": 2,
             "centre": {"x": 20, "y": 20}, "size": {"x": 8, "y": 8}},
        ]}
        (ann / f"{stem}__labels.json").write_text(json.dumps(labels))
    ts = client.create_training_set("labeller", tmp_path / "tiles", ann, format="labeller", class_names=CLASSES)
    want = expected(2, 2, 2, 10, 10)
    want[16:24, 16:24] = 1
    for mask in stored_masks(client, store, ts).values():
        np.testing.assert_array_equal(mask, want)


def test_instance_masks_become_the_given_class(client: Client, store: ObjectStore, tmp_path: Path) -> None:
    stems = write_tiles(tmp_path / "tiles")
    ann = tmp_path / "ann"
    ann.mkdir()
    instances = np.zeros((SIZE, SIZE), np.uint16)
    instances[2:6, 2:6], instances[10:20, 10:20] = 1, 513  # 16-bit labels
    for stem in stems:
        Image.fromarray(instances).save(ann / f"{stem}.png")
    ts = client.create_training_set("instances", tmp_path / "tiles", ann, format="instance-masks",
                                    class_names=CLASSES, instance_class=2)
    for mask in stored_masks(client, store, ts).values():
        np.testing.assert_array_equal(mask, (instances > 0).astype(np.uint8) * 2)


def test_unknown_class_rejects_the_set_naming_the_tile(client: Client, tmp_path: Path,
                                                        pipeline_server: PipelineServer) -> None:
    stems = write_tiles(tmp_path / "tiles")
    ann = tmp_path / "ann"
    ann.mkdir()
    for i, stem in enumerate(stems):
        cls = "mitochondrion" if i == 2 else "cell"
        feature = {"type": "Feature", "properties": {"classification": {"name": cls}},
                   "geometry": {"type": "Polygon", "coordinates": [square(4, 4, 28, 28)]}}
        (ann / f"{stem}.geojson").write_text(json.dumps([feature]))
    with pytest.raises(TrainingSetFailedError) as info:
        client.create_training_set("bad-geo", tmp_path / "tiles", ann, format="geojson", class_names=CLASSES)
    failed = info.value.training_set
    assert [i.tile for i in failed.report.issues if i.severity == pb.ValidationIssue.SEVERITY_ERROR] == ["t2"]
    assert "(tiles[2])" in failed.failure_reason and "mitochondrion" in failed.failure_reason
