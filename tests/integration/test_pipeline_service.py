"""The pipeline service over real gRPC, real S3 (rclone) and SQLite: pipelines, uploads,
training sets, jobs, and how bad input is refused without leaving anything behind."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import sqlalchemy
import tifffile
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlmodel import Session, select

from clients.sdk import Client, TrainingSetFailedError
from services.common import object_keys
from services.common.database import session_scope
from services.common.errors import UnavailableError
from services.common.settings import PipelineSettings, StorageSettings
from services.common.storage import ObjectStore
from services.pipeline_svc import app as pipeline_app
from services.pipeline_svc.resources import pipelines
from services.pipeline_svc.runtime import preparer
from services.pipeline_svc.tables import OutboxRow
from tests.helpers import (
    decompression_bomb,
    error_of,
    png_bytes,
    row_counts,
    upload_bytes,
    violation_fields,
    write_sample_set,
)
from tests.integration.conftest import MetricsServer, PipelineServer

TABLES = ["pipelines", "training_sets", "tiles", "jobs", "models", "analyses", "event_outbox"]


def test_default_pipeline_carries_the_seed_defaults(client: Client) -> None:
    pipelines = {p.name: p for p in client.list_pipelines()}
    default = pipelines["pipelines/segmentation"]
    assert default.type == pb.Pipeline.TYPE_TRAINING
    assert pipelines["pipelines/analysis"].type == pb.Pipeline.TYPE_ANALYSIS
    params = default.default_hyperparameters
    assert (params.batch_size, params.epochs, params.learning_rate, params.architecture) == (
        8, 10, 0.001, "upernet-convnext-base")


def test_architectures_are_listed_with_parameter_counts(client: Client) -> None:
    archs = {a.name: a for a in client.list_architectures()}
    assert archs["upernet-convnext-base"].is_default
    assert archs["upernet-convnext-base"].parameter_count > 100_000_000
    assert 100_000 < archs["upernet-convnext-cpu"].parameter_count < 1_000_000


def test_training_set_is_checked_split_by_source_and_stored(
    training_set: pb.TrainingSet, client: Client, store: ObjectStore
) -> None:
    ts = client.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(name=training_set.name))
    assert ts.tile_count == 12 and ts.train_tile_count + ts.validation_tile_count == 12
    assert ts.validation_tile_count >= 1 and ts.train_tile_count >= 1
    assert ts.snapshot.startswith("sha256:")
    by_source: dict[str, set[bool]] = {}
    for tile in ts.tiles:
        by_source.setdefault(tile.source_image, set()).add(tile.validation)
        assert store.exists(tile.image_uri) and store.exists(tile.mask_uri)
    assert len(by_source) == 3, "12 tiles cut from 3 source images (4 per image)"
    assert all(len(sides) == 1 for sides in by_source.values()), "a source image straddles the split"
    stats = {c.class_name: c for c in ts.report.classes}
    assert stats["nucleus"].pixel_count > 0 and stats["background"].pixel_count > stats["nucleus"].pixel_count


def test_same_content_is_recognised_not_duplicated(client: Client, tmp_path: Path,
                                                   pipeline_server: PipelineServer) -> None:
    tiles, masks = write_sample_set(tmp_path / "set", count=6)
    first = client.create_training_set("again", tiles, masks, class_names=["background", "nucleus", "debris"])
    counts = row_counts(pipeline_server.database_url, ["training_sets", "tiles"])
    second = client.create_training_set("again", tiles, masks, class_names=["background", "nucleus", "debris"])
    assert second.name == first.name and second.snapshot == first.snapshot
    assert row_counts(pipeline_server.database_url, ["training_sets", "tiles"]) == counts
    # The same id with other content is a conflict, not a silent overwrite.
    other_tiles, other_masks = write_sample_set(tmp_path / "other", count=6, seed=5)
    error = error_of(client.create_training_set, "again", other_tiles, other_masks,
                     class_names=["background", "nucleus", "debris"])
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


def test_job_takes_pipeline_defaults_and_honours_overrides(client: Client, training_set: pb.TrainingSet) -> None:
    default = client.create_job(pipeline="segmentation", training_set=training_set.name)
    assert default.state == common_pb2.JOB_STATE_PENDING
    p = default.hyperparameters
    assert (p.batch_size, p.epochs, p.learning_rate, p.architecture) == (8, 10, 0.001, "upernet-convnext-base")
    custom = client.create_job(pipeline="segmentation", training_set=training_set.name,
                               hyperparameters=common_pb2.Hyperparameters(
                                   batch_size=4, epochs=25, learning_rate=0.0003, architecture="upernet-convnext-cpu"))
    p = custom.hyperparameters
    assert (p.batch_size, p.epochs, p.learning_rate, p.architecture) == (4, 25, 0.0003, "upernet-convnext-cpu")


def test_start_moves_pending_to_queued_once(client: Client, training_set: pb.TrainingSet) -> None:
    job = client.create_job(pipeline="segmentation", training_set=training_set.name)
    assert client.start_job(job.name).state == common_pb2.JOB_STATE_QUEUED
    error = error_of(client.start_job, job.name)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "QUEUED" in error.details()


def test_a_retried_create_returns_the_first_job(client: Client, training_set: pb.TrainingSet,
                                                pipeline_server: PipelineServer) -> None:
    first = client.create_job(pipeline="segmentation", training_set=training_set.name, request_id="req-42")
    rows = row_counts(pipeline_server.database_url, ["jobs"])
    again = client.create_job(pipeline="segmentation", training_set=training_set.name, request_id="req-42")
    assert again.name == first.name and row_counts(pipeline_server.database_url, ["jobs"]) == rows


def test_a_request_id_reused_with_other_parameters_is_refused_naming_it(
        client: Client, training_set: pb.TrainingSet, pipeline_server: PipelineServer, tmp_path: Path) -> None:
    params = common_pb2.Hyperparameters(epochs=3, learning_rate=0.003)
    first = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=params,
                              request_id="req-7")
    rows = row_counts(pipeline_server.database_url, ["jobs"])
    for changed in (dict(hyperparameters=common_pb2.Hyperparameters(epochs=4, learning_rate=0.003)),
                    dict(hyperparameters=params, processes=2)):
        error = error_of(client.create_job, pipeline="segmentation", training_set=training_set.name,
                         request_id="req-7", **changed)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violation_fields(error) == {"request_id"}
        assert first.name in error.details()
    # The same parameters (the effective ones it recorded named or left out) are the same job.
    again = client.create_job(pipeline="segmentation", training_set=training_set.name,
                              hyperparameters=common_pb2.Hyperparameters(epochs=3), request_id="req-7")
    assert again.name == first.name and row_counts(pipeline_server.database_url, ["jobs"]) == rows
    tiles, masks = write_sample_set(tmp_path / "other", count=12, seed=5)
    images, annotations = client.upload(sorted(tiles.iterdir())), client.upload(sorted(masks.iterdir()))
    tile_inputs = [pb.TileInput(image_key=images[t], annotation_key=annotations[masks / t.name])
                   for t in sorted(tiles.iterdir())]
    client.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation", class_names=["background", "nucleus", "debris"], tiles=tile_inputs[:6],
        request_id="set-req"))
    reused = error_of(client.pipeline.CreateTrainingSet, pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation", class_names=["background", "nucleus", "debris"], tiles=tile_inputs[6:],
        request_id="set-req"))
    assert reused.code() == grpc.StatusCode.INVALID_ARGUMENT and violation_fields(reused) == {"request_id"}


def test_concurrent_creates_with_one_request_id_make_one_job(
        client: Client, training_set: pb.TrainingSet, pipeline_server: PipelineServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    before = row_counts(pipeline_server.database_url, ["jobs"])["jobs"]
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: client.create_job(pipeline="segmentation", training_set=training_set.name,
                                                         request_id="together"), range(16)))
    assert len({job.name for job in made}) == 1  # no INTERNAL, and one job
    assert row_counts(pipeline_server.database_url, ["jobs"])["jobs"] == before + 1


def test_pipelines_are_idempotent_by_request_id_even_when_created_at_once(
        client: Client, pipeline_server: PipelineServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(request_id: str, tile_size: int = 128) -> pb.Pipeline:
        return client.pipeline.CreatePipeline(pb.CreatePipelineRequest(
            pipeline_id="organoids", request_id=request_id, pipeline=pb.Pipeline(
                display_name="Organoids", type=pb.Pipeline.TYPE_TRAINING, class_names=["background", "organoid"],
                tile_size=tile_size)), timeout=30)

    before = row_counts(pipeline_server.database_url, ["pipelines"])["pipelines"]
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: create("p-together"), range(16)))
    assert {p.name for p in made} == {"pipelines/organoids"}  # no INTERNAL, and one pipeline
    assert row_counts(pipeline_server.database_url, ["pipelines"])["pipelines"] == before + 1
    assert create("p-together").name == "pipelines/organoids"  # a retry gets the first result
    reused = error_of(create, "p-together", tile_size=256)
    assert reused.code() == grpc.StatusCode.INVALID_ARGUMENT and violation_fields(reused) == {"request_id"}
    assert "pipeline.tile_size" in reused.details()
    taken = error_of(create, "p-other")  # another request for a taken id
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS


def test_an_oversized_message_is_refused(client: Client) -> None:
    huge = pb.CreateUploadRequest(file_names=[f"{i:08d}-{'x' * 1000}.png" for i in range(20_000)])  # ~20 MiB
    error = error_of(client.pipeline.CreateUpload, huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancel_of_a_queued_job_ends_it(client: Client, training_set: pb.TrainingSet) -> None:
    job = client.create_job(pipeline="segmentation", training_set=training_set.name)
    client.start_job(job.name)
    assert client.cancel_job(job.name).state == common_pb2.JOB_STATE_CANCELLED
    assert error_of(client.start_job, job.name).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_job_state_changes_reach_the_metrics_log(client: Client, training_set: pb.TrainingSet) -> None:
    job = client.create_job(pipeline="segmentation", training_set=training_set.name)
    client.start_job(job.name)
    client.cancel_job(job.name)
    events = list(client.watch(job.name))
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states == [common_pb2.JOB_STATE_PENDING, common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_CANCELLED]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


Case = tuple[str, Callable[[Client, pb.TrainingSet, Path], object], grpc.StatusCode, str]


def _hp(**kw: object) -> common_pb2.Hyperparameters:
    return common_pb2.Hyperparameters(**kw)  # type: ignore[arg-type]


def _job(**kw: object) -> Callable[[Client, pb.TrainingSet, Path], object]:
    return lambda c, ts, _: c.pipeline.CreateJob(pb.CreateJobRequest(
        pipeline="pipelines/segmentation", training_set=ts.name, **kw))  # type: ignore[arg-type]


def _image(h: int = 64, w: int = 64) -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(h: int = 64, w: int = 64, value: int = 1) -> bytes:
    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 10:20] = value
    return png_bytes(mask)


def _pipeline(**kw: object) -> Callable[[Client, pb.TrainingSet, Path], object]:
    fields: dict[str, object] = dict(display_name="p", type=pb.Pipeline.TYPE_TRAINING, tile_size=256,
                                     class_names=["background", "cell"])
    fields.update(kw)
    return lambda c, ts, _: c.pipeline.CreatePipeline(pb.CreatePipelineRequest(
        pipeline_id="bad-pipeline", pipeline=pb.Pipeline(**fields)))  # type: ignore[arg-type]


def _set(**kw: object) -> Callable[[Client, pb.TrainingSet, Path], object]:
    return lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation", tiles=[pb.TileInput(image_key="uploads/a/b.png",
                                                               annotation_key="uploads/a/c.png")],
        **kw))  # type: ignore[arg-type]


def _node(**kw: object) -> Callable[[Client, pb.TrainingSet, Path], object]:
    fields: dict[str, object] = dict(node_id="n-1", address="127.0.0.1:1", capacity=1, device="cpu")
    fields.update(kw)
    return lambda c, ts, _: c.pipeline.RegisterTrainerNode(pb.RegisterTrainerNodeRequest(**fields))  # type: ignore[arg-type]


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack")
    return buf.getvalue()




BAD_REQUESTS: list[Case] = [
    ("unknown pipeline", lambda c, ts, _: c.pipeline.GetPipeline(pb.GetPipelineRequest(name="pipelines/nope")),
     grpc.StatusCode.NOT_FOUND, ""),
    ("malformed pipeline name", lambda c, ts, _: c.pipeline.GetPipeline(pb.GetPipelineRequest(name="pipes/A B")),
     grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("job on unknown pipeline", lambda c, ts, _: c.pipeline.CreateJob(pb.CreateJobRequest(
        pipeline="pipelines/nope", training_set=ts.name)), grpc.StatusCode.NOT_FOUND, ""),
    ("job on unknown training set", lambda c, ts, _: c.pipeline.CreateJob(pb.CreateJobRequest(
        pipeline="pipelines/segmentation", training_set="trainingSets/nope")), grpc.StatusCode.NOT_FOUND, ""),
    ("job from unknown model", _job(from_model="models/nope"), grpc.StatusCode.NOT_FOUND, ""),
    ("batch size 0", _job(hyperparameters=_hp(batch_size=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.batch_size"),
    ("negative batch size", _job(hyperparameters=_hp(batch_size=-3)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.batch_size"),
    ("epochs 0", _job(hyperparameters=_hp(epochs=0)), grpc.StatusCode.INVALID_ARGUMENT, "hyperparameters.epochs"),
    ("learning rate NaN", _job(hyperparameters=_hp(learning_rate=math.nan)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.learning_rate"),
    ("learning rate inf", _job(hyperparameters=_hp(learning_rate=math.inf)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.learning_rate"),
    ("learning rate 0", _job(hyperparameters=_hp(learning_rate=0.0)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.learning_rate"),
    ("negative learning rate", _job(hyperparameters=_hp(learning_rate=-0.1)), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.learning_rate"),
    ("unknown architecture", _job(hyperparameters=_hp(architecture="resnet-9000")), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.architecture"),
    ("unknown loss", _job(hyperparameters=_hp(loss="hinge")), grpc.StatusCode.INVALID_ARGUMENT,
     "hyperparameters.loss"),
    ("processes beyond the bound", _job(parallelism=common_pb2.Parallelism(processes=65)),
     grpc.StatusCode.INVALID_ARGUMENT, "parallelism.processes"),
    ("negative nodes", _job(parallelism=common_pb2.Parallelism(nodes=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "parallelism.nodes"),
    ("more processes than the batch", _job(hyperparameters=_hp(batch_size=4), parallelism=common_pb2.Parallelism(
        processes=3, nodes=2)), grpc.StatusCode.INVALID_ARGUMENT, "parallelism.processes"),
    # 4,096 tiles of 8,192² per step: more memory than any machine has, refused before any node tries.
    ("crop 8192 x batch 4096", _job(hyperparameters=_hp(batch_size=4096, crop_size=8192)),
     grpc.StatusCode.INVALID_ARGUMENT, "hyperparameters.batch_size"),
    ("pretrained weights with a parent", _job(from_model="models/m-x", pretrained_weights="uploads/a/w.safetensors"),
     grpc.StatusCode.INVALID_ARGUMENT, "pretrained_weights"),
    ("pretrained weights outside uploads", _job(pretrained_weights="jobs/j-1/models/best.safetensors"),
     grpc.StatusCode.INVALID_ARGUMENT, "pretrained_weights"),
    ("set without tiles", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation")), grpc.StatusCode.INVALID_ARGUMENT, "tiles"),
    ("set on unknown pipeline", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/nope",
        tiles=[pb.TileInput(image_key="uploads/a/b.png", annotation_key="uploads/a/c.png")])),
     grpc.StatusCode.NOT_FOUND, ""),
    ("traversal key", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation",
        tiles=[pb.TileInput(image_key="uploads/../jobs/secret.png", annotation_key="uploads/a/m.png")])),
     grpc.StatusCode.INVALID_ARGUMENT, "tiles[0].image_key"),
    ("key outside uploads", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation",
        tiles=[pb.TileInput(image_key="jobs/j-1/models/best.safetensors", annotation_key="uploads/a/m.png")])),
     grpc.StatusCode.INVALID_ARGUMENT, "tiles[0].image_key"),
    ("start unknown job", lambda c, ts, _: c.pipeline.StartJob(pb.StartJobRequest(name="jobs/nope")),
     grpc.StatusCode.NOT_FOUND, ""),
    ("unknown model", lambda c, ts, _: c.pipeline.GetModel(pb.GetModelRequest(name="models/nope")),
     grpc.StatusCode.NOT_FOUND, ""),
    ("analysis with unknown model", lambda c, ts, _: c.pipeline.AnalyzeTiles(pb.AnalyzeTilesRequest(
        model="models/nope", image_keys=["uploads/a/b.png"])), grpc.StatusCode.NOT_FOUND, ""),
    ("analysis job of no tiles", lambda c, ts, _: c.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
        model="models/nope")), grpc.StatusCode.INVALID_ARGUMENT, "image_keys"),
    ("analysis job of tiles and a set", lambda c, ts, _: c.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
        model="models/nope", image_keys=["uploads/a/b.png"], training_set=ts.name)),
     grpc.StatusCode.INVALID_ARGUMENT, "image_keys"),
    ("analysis job of a traversal key", lambda c, ts, _: c.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
        model="models/nope", image_keys=["uploads/a/b.png", "uploads/../jobs/x.png"])),
     grpc.StatusCode.INVALID_ARGUMENT, "image_keys[1]"),
    ("analysis job of two tiles of one name", lambda c, ts, _: c.pipeline.CreateAnalysisJob(
        pb.CreateAnalysisJobRequest(model="models/nope", image_keys=["uploads/a/b.png", "uploads/c/b.tif"])),
     grpc.StatusCode.INVALID_ARGUMENT, "image_keys[1]"),
    ("analysis job of too many tiles", lambda c, ts, _: c.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
        model="models/nope", image_keys=[f"uploads/u/{i}.png" for i in range(100_001)])),
     grpc.StatusCode.INVALID_ARGUMENT, "image_keys"),
    ("analysis job with an unknown model", lambda c, ts, _: c.pipeline.CreateAnalysisJob(
        pb.CreateAnalysisJobRequest(model="models/nope", image_keys=["uploads/a/b.png"])),
     grpc.StatusCode.NOT_FOUND, ""),
    ("analysis job on a training pipeline", lambda c, ts, _: c.pipeline.CreateAnalysisJob(
        pb.CreateAnalysisJobRequest(model="models/nope", image_keys=["uploads/a/b.png"],
                                    pipeline="pipelines/segmentation")), grpc.StatusCode.FAILED_PRECONDITION, ""),
    ("unknown analysis job", lambda c, ts, _: c.pipeline.GetAnalysisJob(pb.GetAnalysisJobRequest(
        name="analyses/nope")), grpc.StatusCode.NOT_FOUND, ""),
    ("analysis job named as a job", lambda c, ts, _: c.pipeline.GetAnalysisJob(pb.GetAnalysisJobRequest(
        name="jobs/j-1")), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("tiles of an unknown analysis", lambda c, ts, _: c.pipeline.ListAnalysisTiles(pb.ListAnalysisTilesRequest(
        name="analyses/nope")), grpc.StatusCode.NOT_FOUND, ""),
    ("cancel an unknown analysis", lambda c, ts, _: c.pipeline.CancelAnalysisJob(pb.CancelAnalysisJobRequest(
        name="analyses/nope")), grpc.StatusCode.NOT_FOUND, ""),
    ("bad page token", lambda c, ts, _: c.pipeline.ListJobs(pb.ListJobsRequest(page_token="garbage!")),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("upload with a path", lambda c, ts, _: c.pipeline.CreateUpload(pb.CreateUploadRequest(
        file_names=["../../etc/passwd"])), grpc.StatusCode.INVALID_ARGUMENT, "file_names[0]"),
    # Field sizes (services.common.request_limits, declared in the protos), refused before any handler.
    ("request_id over its column", _job(request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT,
     "request_id"),  # was INTERNAL on PostgreSQL
    ("display name of a megabyte", _job(display_name="d" * 2**20), grpc.StatusCode.INVALID_ARGUMENT, "display_name"),
    ("pretrained weights of 5,000 characters", _job(pretrained_weights="uploads/" + "w" * 5000),
     grpc.StatusCode.INVALID_ARGUMENT, "pretrained_weights"),
    ("architecture of 5,000 characters", _job(hyperparameters=_hp(architecture="a" * 5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "hyperparameters.architecture"),
    ("256 classes", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation", class_names=[f"c{i}" for i in range(256)],
        tiles=[pb.TileInput(image_key="uploads/a/b.png", annotation_key="uploads/a/c.png")])),
     grpc.StatusCode.INVALID_ARGUMENT, "class_names"),
    ("class name of 200 characters", lambda c, ts, _: c.pipeline.CreatePipeline(pb.CreatePipelineRequest(
        pipeline_id="long-class", pipeline=pb.Pipeline(tile_size=256, class_names=["background", "c" * 200]))),
     grpc.StatusCode.INVALID_ARGUMENT, "pipeline.class_names[1]"),
    ("tile key of 2,000 characters", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation",
        tiles=[pb.TileInput(image_key="uploads/a/b.png", annotation_key="uploads/a/c.png"),
               pb.TileInput(image_key="uploads/a/" + "k" * 2000, annotation_key="uploads/a/c.png")])),
     grpc.StatusCode.INVALID_ARGUMENT, "tiles[1].image_key"),
    ("20,001 tiles", lambda c, ts, _: c.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        pipeline="pipelines/segmentation",
        tiles=[pb.TileInput(image_key=f"uploads/a/{i}.png") for i in range(20_001)])),
     grpc.StatusCode.INVALID_ARGUMENT, "tiles"),
    ("1,001 tiles to analyse at once", lambda c, ts, _: c.pipeline.AnalyzeTiles(pb.AnalyzeTilesRequest(
        model="models/nope", image_keys=[f"uploads/u/{i}.png" for i in range(1001)])),
     grpc.StatusCode.INVALID_ARGUMENT, "image_keys"),
    ("5,001 files to upload", lambda c, ts, _: c.pipeline.CreateUpload(pb.CreateUploadRequest(
        file_names=[f"{i}.png" for i in range(5001)])), grpc.StatusCode.INVALID_ARGUMENT, "file_names"),
    ("page token of 5,000 characters", lambda c, ts, _: c.pipeline.ListJobs(pb.ListJobsRequest(page_token="p" * 5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("name of 5,000 characters", lambda c, ts, _: c.pipeline.GetJob(pb.GetJobRequest(name="jobs/" + "j" * 5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("pipeline tile size 16", _pipeline(tile_size=16), grpc.StatusCode.INVALID_ARGUMENT, "pipeline.tile_size"),
    ("pipeline tile size 9,000", _pipeline(tile_size=9000), grpc.StatusCode.INVALID_ARGUMENT, "pipeline.tile_size"),
    ("pipeline of one class", _pipeline(class_names=["background"]), grpc.StatusCode.INVALID_ARGUMENT,
     "pipeline.class_names"),
    ("pipeline with a repeated class", _pipeline(class_names=["background", "cell", "cell"]),
     grpc.StatusCode.INVALID_ARGUMENT, "pipeline.class_names"),
    ("pipeline id with capitals", lambda c, ts, _: c.pipeline.CreatePipeline(pb.CreatePipelineRequest(
        pipeline_id="Bad_Id", pipeline=pb.Pipeline(display_name="x", type=pb.Pipeline.TYPE_TRAINING, tile_size=256,
                                                   class_names=["background", "cell"]))),
     grpc.StatusCode.INVALID_ARGUMENT, "pipeline_id"),
    ("pipeline without a type", _pipeline(type=pb.Pipeline.TYPE_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT,
     "pipeline.type"),
    ("negative page size", lambda c, ts, _: c.pipeline.ListJobs(pb.ListJobsRequest(page_size=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
    ("validation fraction 1.5", _set(validation_fraction=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     "validation_fraction"),
    ("unknown annotation format", _set(format=99), grpc.StatusCode.INVALID_ARGUMENT, "format"),
    ("instance class 0", _set(format=pb.ANNOTATION_FORMAT_INSTANCE_MASKS, instance_class=0),
     grpc.StatusCode.INVALID_ARGUMENT, "instance_class"),
    ("COCO without its file", _set(format=pb.ANNOTATION_FORMAT_COCO), grpc.StatusCode.INVALID_ARGUMENT,
     "annotations_key"),
    ("set id with a slash", _set(training_set_id="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "training_set_id"),
    ("upload of no files", lambda c, ts, _: c.pipeline.CreateUpload(pb.CreateUploadRequest()),
     grpc.StatusCode.INVALID_ARGUMENT, "file_names"),
    ("upload of one name twice", lambda c, ts, _: c.pipeline.CreateUpload(pb.CreateUploadRequest(
        file_names=["a.png", "a.png"])), grpc.StatusCode.INVALID_ARGUMENT, "file_names"),
    ("compare one job", lambda c, ts, _: c.pipeline.CompareJobs(pb.CompareJobsRequest(jobs=["jobs/j-1"])),
     grpc.StatusCode.INVALID_ARGUMENT, "jobs"),
    ("training set named by traversal", lambda c, ts, _: c.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(
        name="trainingSets/../x")), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("node id with capitals", _node(node_id="Node_1"), grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
    ("node address without a port", _node(address="localhost"), grpc.StatusCode.INVALID_ARGUMENT, "address"),
    ("node capacity 65", _node(capacity=65), grpc.StatusCode.INVALID_ARGUMENT, "capacity"),
    ("node of negative memory", _node(job_memory_bytes=-1), grpc.StatusCode.INVALID_ARGUMENT, "job_memory_bytes"),
]


@pytest.mark.parametrize(("label", "call", "code", "field"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_refused_naming_the_field_and_leaves_nothing(
    label: str, call: Callable[[Client, pb.TrainingSet, Path], object], code: grpc.StatusCode, field: str,
    client: Client, training_set: pb.TrainingSet, tmp_path: Path, pipeline_server: PipelineServer,
    store: ObjectStore,
) -> None:
    rows = row_counts(pipeline_server.database_url, TABLES)
    snapshots = set(store.list_keys("training-sets/"))
    analyses = set(store.list_keys("analyses/"))
    error = error_of(call, client, training_set, tmp_path)
    assert error.code() == code, error.details()
    if field:
        assert field in violation_fields(error), (field, error.details())
    assert "Traceback" not in error.details() and "/work" not in error.details()
    assert row_counts(pipeline_server.database_url, TABLES) == rows
    assert set(store.list_keys("training-sets/")) == snapshots
    assert set(store.list_keys("analyses/")) == analyses


def test_internal_errors_reveal_nothing(client: Client, pipeline_server: PipelineServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    monkeypatch.setattr(pipeline_server.service, "get_job", explode)
    error = error_of(client.get_job, "jobs/j-123")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details().startswith("internal error (incident ")
    assert "hunter2" not in error.details() and "/srv" not in error.details()


def test_an_outbox_row_refused_for_good_is_parked_and_does_not_block_later_events(
        client: Client, pipeline_server: PipelineServer, training_set: pb.TrainingSet) -> None:
    """The metrics service refuses an event without a payload (INVALID_ARGUMENT): retrying it can
    never succeed, so it is parked and every later state change of every job still arrives."""
    engine = sqlalchemy.create_engine(pipeline_server.database_url)
    with Session(engine) as session:
        bad = common_pb2.JobEvent(job="jobs/j-000000000bad", attempt=0, source_seq=1)  # no payload
        session.add(OutboxRow(job=bad.job, payload=bad.SerializeToString()))
        session.commit()
    job = client.create_job(pipeline="segmentation", training_set=training_set.name)
    client.cancel_job(job.name)
    deadline = time.monotonic() + 10  # before the fix the relay retried the bad row forever
    while True:
        with Session(engine) as session:
            left = list(session.exec(select(OutboxRow)))
        if [r.job for r in left] == ["jobs/j-000000000bad"] and left[0].parked:
            break
        assert time.monotonic() < deadline, [(r.job, r.parked) for r in left]
        time.sleep(0.1)
    assert left[0].park_reason.startswith("INVALID_ARGUMENT")
    events = list(client.watch(job.name))  # the job's log is complete, so the watch ends
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states == [common_pb2.JOB_STATE_PENDING, common_pb2.JOB_STATE_CANCELLED]
    engine.dispose()


def test_admission_refuses_a_job_no_registered_node_can_hold_naming_what_to_change(
        client: Client, training_set: pb.TrainingSet) -> None:
    """Nodes say what one job may use there; CreateJob refuses what fits none of them."""
    client.pipeline.RegisterTrainerNode(pb.RegisterTrainerNodeRequest(
        node_id="small", address="127.0.0.1:1", device="cpu", job_memory_bytes=10 * 2**30, max_processes=2))
    node, = client.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest()).trainer_nodes
    assert (node.job_memory_bytes, node.max_processes) == (10 * 2**30, 2)

    def create(**kw: object) -> pb.Job:
        return client.pipeline.CreateJob(pb.CreateJobRequest(pipeline="pipelines/segmentation",
                                                             training_set=training_set.name, **kw))  # type: ignore[arg-type]

    too_big = error_of(lambda: create(hyperparameters=_hp(architecture="upernet-convnext-base", batch_size=16)))
    assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(too_big) == {"hyperparameters.batch_size"}
    assert "10.0 GB" in too_big.details() and "lower the batch size" in too_big.details()
    # Two ConvNeXt-B processes do not fit 10 GB even at one small tile each: change the architecture.
    base = error_of(lambda: create(hyperparameters=_hp(architecture="upernet-convnext-base", batch_size=2),
                                   parallelism=common_pb2.Parallelism(processes=2)))
    assert violation_fields(base) == {"hyperparameters.architecture"}
    assert violation_fields(error_of(lambda: create(parallelism=common_pb2.Parallelism(processes=4)))) == {
        "parallelism.processes"}  # the node starts at most 2
    job = create(hyperparameters=_hp(architecture="upernet-convnext-cpu", batch_size=4),
                 parallelism=common_pb2.Parallelism(processes=2))
    assert (job.parallelism.processes, job.parallelism.nodes) == (2, 1)


UNUSABLE = [  # (label, the files of a one-tile set, the code of its error, or "" for a whole-set one)
    ("missing tile object", lambda: {"m.png": _mask()}, "MISSING"),
    ("corrupt tile", lambda: {"t.png": b"\x89PNG\r\n\x1a\nnot really", "m.png": _mask()}, "UNREADABLE"),
    ("truncated tile", lambda: {"t.png": _image()[:200], "m.png": _mask()}, "UNREADABLE"),
    ("tile larger than the pipeline's tile size", lambda: {"t.png": _image(64, 300), "m.png": _mask(64, 300)},
     "TOO_LARGE"),
    ("mask size mismatch", lambda: {"t.png": _image(), "m.png": _mask(32, 32)}, "SIZE_MISMATCH"),
    ("empty tile", lambda: {"t.png": b"", "m.png": _mask()}, "UNREADABLE"),
    ("tile of six channels", lambda: {"t.png": _tiff(np.zeros((64, 64, 6), np.uint8)), "m.png": _mask()},
     "UNREADABLE"),
    ("tile with NaN", lambda: {"t.png": _tiff(np.full((64, 64), np.nan, np.float32)), "m.png": _mask()},
     "UNREADABLE"),
    ("tile that is text", lambda: {"t.png": b"GIF89a not an image at all", "m.png": _mask()}, "UNREADABLE"),
    # Judged from the header: nothing is decoded (segcore.limits).
    ("decompression bomb tile (PNG)", lambda: {"t.png": decompression_bomb("PNG"), "m.png": _mask()}, "TOO_LARGE"),
    ("decompression bomb tile (TIFF)", lambda: {"t.png": decompression_bomb("TIFF", compression="tiff_deflate"),
                                                "m.png": _mask()}, "TOO_LARGE"),
    ("decompression bomb mask", lambda: {"t.png": _image(), "m.png": decompression_bomb("PNG")}, "SIZE_MISMATCH"),
    ("unknown class in mask", lambda: {"t.png": _image(), "m.png": _mask(value=7)}, "BAD_CLASS_INDEX"),
    ("set too small to split", lambda: {"t.png": _image(), "m.png": _mask()}, ""),
]


@pytest.mark.parametrize(("label", "files", "code"), UNUSABLE, ids=[u[0] for u in UNUSABLE])
def test_a_set_with_an_unusable_tile_ends_failed_naming_it_stores_nothing_and_takes_no_job(
    label: str, files: Callable[[], dict[str, bytes]], code: str, client: Client, tmp_path: Path,
    pipeline_server: PipelineServer, store: ObjectStore,
) -> None:
    tiles_before = row_counts(pipeline_server.database_url, ["tiles"])
    keys = upload_bytes(client, tmp_path / "bad", files())
    created = client.pipeline.CreateTrainingSet(pb.CreateTrainingSetRequest(
        training_set_id="bad-set", pipeline="pipelines/segmentation", class_names=["background", "cell"],
        tiles=[pb.TileInput(image_key=keys.get("t.png", "uploads/x/t.png"),
                            annotation_key=keys.get("m.png", "uploads/x/missing-mask.png"))]))
    assert created.state == pb.TrainingSet.STATE_PREPARING and created.tile_count == 1  # returned at once
    with pytest.raises(TrainingSetFailedError) as failed:
        client.wait_for_training_set(created.name, timeout_s=30)
    ts = failed.value.training_set
    errors = [i for i in ts.report.issues if i.severity == pb.ValidationIssue.SEVERITY_ERROR]
    if code:
        assert "tile 't' (tiles[0])" in ts.failure_reason, ts.failure_reason
        assert [(e.tile, e.code) for e in errors] == [("t", code)], errors
    else:
        assert ts.failure_reason.startswith("tiles: "), ts.failure_reason
    assert "Traceback" not in ts.failure_reason and "/work" not in ts.failure_reason
    assert store.list_keys("training-sets/bad-set/") == []  # what it stored is gone
    assert row_counts(pipeline_server.database_url, ["tiles"]) == tiles_before
    refused = error_of(client.create_job, pipeline="segmentation", training_set=ts.name)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in refused.details()


def test_a_set_is_prepared_off_the_request_and_reports_its_progress(
        client: Client, tmp_path: Path, pipeline_server: PipelineServer) -> None:
    tiles, masks = write_sample_set(tmp_path / "set", count=40, tile_size=64)
    states = []
    ts = client.create_training_set("progress", tiles, masks, class_names=["background", "nucleus", "debris"],
                                    on_progress=lambda t: states.append((t.state, t.tiles_checked)))
    assert states[0][0] == pb.TrainingSet.STATE_PREPARING and states[-1][0] == pb.TrainingSet.STATE_READY
    checked = [n for state, n in states]
    assert checked == sorted(checked) and checked[-1] == 40  # progress only moves forward
    assert ts.tile_count == 40 and len(ts.tiles) == 40 and ts.update_time.seconds >= ts.create_time.seconds
    # A retried request returns the set as it is, READY, and prepares nothing again.
    again = client.create_training_set("progress", tiles, masks, class_names=["background", "nucleus", "debris"])
    assert again.state == pb.TrainingSet.STATE_READY and again.snapshot == ts.snapshot


def test_preparation_holds_to_its_memory_budget(tmp_path: Path, s3_settings: StorageSettings,
                                               metrics_server: MetricsServer) -> None:
    """With a budget below what one tile of the pipeline's size may take, each tile first holds
    all of it (so none runs beside another until its header is read), and the set is prepared."""
    settings = PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'pipeline.db'}",
                                metrics_address=metrics_server.address, prepare_memory_mb=16)
    server, port, _, service = pipeline_app.build(settings, s3_settings)
    service.start()
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            tiles, masks = write_sample_set(tmp_path / "set", count=12, tile_size=64)
            ts = client.create_training_set("budgeted", tiles, masks, class_names=["background", "nucleus", "debris"])
        assert ts.state == pb.TrainingSet.STATE_READY and ts.tile_count == 12
        budget = service._preparer.budget
        assert budget.peak == budget.total == 16 * 2**20  # a tile held it all, and never more was held
    finally:
        service.stop()
        server.stop(0).wait()


def test_a_preparing_set_takes_no_job_and_a_service_that_starts_prepares_it(
        tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer) -> None:
    """A set recorded PREPARING by a service that stopped before preparing it (here: one whose
    background work is not started yet) waits, refuses jobs, and is prepared when a service starts."""
    settings = PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'pipeline.db'}",
                                metrics_address=metrics_server.address, schedule_interval_s=0.2)
    server, port, _, service = pipeline_app.build(settings, s3_settings)
    with session_scope(service.engine) as session:
        pipelines.seed_pipelines(session)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            tiles, masks = write_sample_set(tmp_path / "set", count=6, tile_size=64)
            ts = client.create_training_set("waiting", tiles, masks, class_names=["background", "nucleus", "debris"],
                                            wait=False)
            assert ts.state == pb.TrainingSet.STATE_PREPARING and ts.tiles_checked == 0 and not ts.snapshot
            refused = error_of(client.create_job, pipeline="segmentation", training_set=ts.name)
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.details()
            assert "still being prepared" in refused.details() and "training_set" in refused.details()
            service.start()
            ready = client.wait_for_training_set(ts.name, timeout_s=60)
            assert ready.tile_count == 6 and ready.snapshot.startswith("sha256:")
            assert client.create_job(pipeline="segmentation", training_set=ts.name).name
    finally:
        service.stop()
        server.stop(0).wait()


class _FlakyStore:
    """The service's store, whose next `outages` reads of uploaded files fail as in an outage."""

    def __init__(self, store: ObjectStore, outages: int) -> None:
        self._store, self.outages, self.failed = store, outages, 0

    def get(self, key: str, **kwargs: object) -> bytes:
        if key.startswith(object_keys.UPLOADS) and self.failed < self.outages:
            self.failed += 1
            raise UnavailableError("object store unreachable")
        return self._store.get(key, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.mark.parametrize("outages", [2, 10**6])
def test_an_outage_under_preparation_is_retried_and_a_lasting_one_fails_the_set(
        outages: int, tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An object store that fails under a preparation leaves the set PREPARING and it is prepared
    again from the start (nothing is wrong with the set); one that keeps failing ends it FAILED
    after MAX_TRIES, saying why and naming no tile."""
    monkeypatch.setattr(preparer, "POLL_S", 0.1)
    settings = PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'pipeline.db'}",
                                metrics_address=metrics_server.address)
    server, port, _, service = pipeline_app.build(settings, s3_settings)
    flaky = _FlakyStore(service.store, outages)
    service._preparer._store = flaky  # type: ignore[assignment]
    service.start()
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            tiles, masks = write_sample_set(tmp_path / "set", count=6, tile_size=64)
            classes = ["background", "nucleus", "debris"]
            if outages == 2:
                ts = client.create_training_set("flaky", tiles, masks, class_names=classes)
                assert ts.state == pb.TrainingSet.STATE_READY and ts.tile_count == 6 and flaky.failed == 2
                return
            with pytest.raises(TrainingSetFailedError) as info:
                client.create_training_set("down", tiles, masks, class_names=classes)
        failed = info.value.training_set
        assert "could not reach its object store" in failed.failure_reason
        assert f"for {preparer.MAX_TRIES} tries" in failed.failure_reason and not failed.report.issues
        assert flaky.failed >= preparer.MAX_TRIES
        assert not service.store.list_keys(object_keys.training_set_prefix(failed.name.split("/")[-1]))
    finally:
        service.stop()
        server.stop(0).wait()
