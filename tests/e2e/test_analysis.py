"""Analysis jobs against the real stack: created at once, scheduled on a trainer node, followed
on the job event stream, cancelled; masks, per-tile and per-class statistics downloadable."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from services.common import object_keys
from services.common.storage import ObjectStore
from tests.helpers import error_of, violation_fields, write_sample_set

pytestmark = pytest.mark.e2e
CLASSES = ["background", "nucleus", "debris"]
S = common_pb2
ENDED = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}


@pytest.fixture()
def model(trained_model: pb.Model) -> pb.Model:
    return trained_model


def test_an_analysis_job_measures_every_tile_and_its_results_download(
        client: Client, model: pb.Model, stack_store: ObjectStore, tmp_path: Path) -> None:
    tiles, _ = write_sample_set(tmp_path / "new", count=5, tile_size=64, seed=41)
    paths = sorted(tiles.iterdir())
    (tmp_path / "bad").mkdir()
    corrupt = tmp_path / "bad" / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    keys = client.upload([*paths, corrupt])
    missing = "uploads/never-uploaded/missing.png"
    created = client.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
        model=model.name, image_keys=[*(keys[p] for p in paths), keys[corrupt], missing]), timeout=30)
    assert created.name.startswith("analyses/") and created.state == S.JOB_STATE_QUEUED
    assert created.tile_count == 7 and created.model == model.name

    events = list(client.watch(created.name))
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "gap or duplicate in the stream"
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states[:2] == [S.JOB_STATE_PENDING, S.JOB_STATE_QUEUED] and states[-1] == S.JOB_STATE_SUCCEEDED
    assert S.JOB_STATE_RUNNING in states
    progress = [e.progress for e in events if e.HasField("progress") and e.progress.phase == S.PHASE_ANALYSING]
    assert progress and progress[-1].tiles_done == progress[-1].tiles == 7
    warnings = [e.warning for e in events if e.HasField("warning")]
    assert any(w.code == "TILES_FAILED" and "corrupt" in w.message for w in warnings)

    done = client.get_analysis(created.name)
    assert done.state == S.JOB_STATE_SUCCEEDED and done.progress.percent == 100
    assert (done.results.tiles_analysed, done.results.tiles_failed) == (5, 2)
    assert created.name in {a.name for a in client.list_analyses()}
    assert created.name not in {j.name for j in client.list_jobs()}

    out = tmp_path / "out"
    results = client.download_analysis(done, out)
    assert [t.tile for t in results] == [p.stem for p in paths] + ["corrupt", "missing"]
    by_tile = {t.tile: t for t in results}
    assert by_tile["missing"].error == "image not found" and not by_tile["missing"].mask_uri
    assert by_tile["corrupt"].error and not (out / "corrupt.png").exists()
    totals = np.zeros(len(CLASSES), dtype=np.int64)
    objects = np.zeros(len(CLASSES), dtype=np.int64)
    for path in paths:
        tile = by_tile[path.stem]
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert mask.shape == (64, 64) and stack_store.exists(tile.mask_uri)
        assert tile.mask_uri.startswith(f"{created.name}/attempts/1/masks/")
        for c in tile.classes:
            assert c.pixel_count == int((mask == c.class_index).sum())
            assert c.fraction == pytest.approx(c.pixel_count / mask.size)
            expected = ndimage.label(mask == c.class_index, structure=np.ones((3, 3)))[1]
            assert c.object_count == expected
            totals[c.class_index] += c.pixel_count
            objects[c.class_index] += c.object_count
    assert [c.pixel_count for c in done.results.classes] == totals.tolist()
    assert [c.object_count for c in done.results.classes] == objects.tolist()
    assert sum(c.area_fraction for c in done.results.classes) == pytest.approx(1.0)

    rows = list(csv.DictReader(io.StringIO((out / "tiles.csv").read_text())))
    assert len(rows) == 5 * len(CLASSES) + 2
    assert {int(r["pixel_count"]) for r in rows if r["tile"] == paths[0].stem and r["class_index"] == "0"} == {
        by_tile[paths[0].stem].classes[0].pixel_count}
    assert [r["tile"] for r in json.loads((out / "tiles.json").read_text())] == [t.tile for t in results]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == model.name and manifest["class_names"] == CLASSES
    assert manifest["tiles_failed"] == 2 and len(manifest["tiles"]) == 7
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == done.results.manifest.sha256
    assert [c["object_count"] for c in json.loads((out / "classes.json").read_text())] == objects.tolist()
    assert len(list(csv.DictReader(io.StringIO((out / "classes.csv").read_text())))) == len(CLASSES)


def test_an_analysis_job_can_analyse_a_training_sets_tiles(client: Client, model: pb.Model) -> None:
    created = client.create_analysis(model.name, training_set=model.training_set)
    done = client.wait_for_analysis(created.name)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.training_set == model.training_set and done.results.tiles_analysed == 8
    names = {t.name for t in client.get_training_set(model.training_set).tiles}
    assert {t.tile for t in client.analysis_tiles(done.name)} == names


def test_an_analysis_request_id_makes_one_analysis_and_is_refused_with_other_parameters(
        client: Client, model: pb.Model, stack_store: ObjectStore, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda _: client.create_analysis(model.name, training_set=model.training_set,
                                                              request_id="analyse-once"), range(8)))
    assert len({a.name for a in made}) == 1  # no INTERNAL, and one analysis
    assert made[0].owner == "local-trainer"  # the stack's trainer token made it
    assert [a.name for a in client.list_analyses(owner="local-trainer")].count(made[0].name) == 1
    tiles, _ = write_sample_set(tmp_path / "other", count=2, tile_size=64, seed=3)
    reused = error_of(client.create_analysis, model.name, tiles=sorted(tiles.iterdir()), request_id="analyse-once")
    assert reused.code() == grpc.StatusCode.INVALID_ARGUMENT and violation_fields(reused) == {"request_id"}
    assert made[0].name in reused.details()
    # Deleted once it has ended (not before), with everything it stored.
    if client.get_analysis(made[0].name).state not in ENDED:
        assert error_of(client.delete_analysis, made[0].name).code() == grpc.StatusCode.FAILED_PRECONDITION
        try:
            client.cancel_analysis(made[0].name)
        except grpc.RpcError as exc:  # it ended meanwhile
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
    client.wait_for_analysis(made[0].name)
    client.delete_analysis(made[0].name)
    assert error_of(client.get_analysis, made[0].name).code() == grpc.StatusCode.NOT_FOUND
    prefix = object_keys.analysis_prefix(made[0].name.removeprefix("analyses/"))
    assert stack_store.list_keys(prefix) == []


def test_cancelling_a_running_analysis_stops_its_node_work(client: Client, model: pb.Model, stack: LocalStack,
                                                           tmp_path: Path) -> None:
    tiles, _ = write_sample_set(tmp_path / "many", count=400, tile_size=64, seed=8)
    created = client.create_analysis(model.name, tiles=sorted(tiles.iterdir()))
    deadline = time.monotonic() + 120
    while (current := client.get_analysis(created.name)).progress.tiles_done == 0:
        assert time.monotonic() < deadline and current.state not in {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}
        time.sleep(0.2)
    assert current.state == S.JOB_STATE_RUNNING and current.progress.tiles_done < 400
    assert client.cancel_analysis(created.name).state == S.JOB_STATE_CANCELLING
    ended = client.wait_for_analysis(created.name)
    assert ended.state == S.JOB_STATE_CANCELLED and not ended.HasField("results")
    trainers = [p.popen.pid for name, p in stack.processes.items() if name.startswith("trainer-")]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}/task/{pid}/children").read_text().strip() for pid in trainers):
        assert time.monotonic() < deadline, "a trainer node still runs the cancelled analysis's worker"
        time.sleep(0.2)
