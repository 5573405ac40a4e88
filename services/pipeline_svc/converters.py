"""The pipeline service's boundary with the wire, both ways: API requests -> domain values
(`*_spec`), rows and domain values -> API messages (`*_message`), and rows -> what a trainer node
is sent to run a job or an analysis (`run_job_request`, `model_ref`). The runtime's relays and
analysis read the trainer's and metrics service's answers themselves, where they receive them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2

from segcore import catalogue
from segcore.hyperparameters import DEFAULT_ARCHITECTURE
from services.common import hyperparameters as wire
from services.common import names, object_keys
from services.common.timeutil import to_timestamp
from services.pipeline_svc import domain
from services.pipeline_svc.resources import hyperparameters
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TileRow, TrainerNodeRow, TrainingSetRow

FORMATS = {
    pb.ANNOTATION_FORMAT_UNSPECIFIED: "masks", pb.ANNOTATION_FORMAT_MASKS: "masks",
    pb.ANNOTATION_FORMAT_INSTANCE_MASKS: "instance-masks", pb.ANNOTATION_FORMAT_COCO: "coco",
    pb.ANNOTATION_FORMAT_GEOJSON: "geojson", pb.ANNOTATION_FORMAT_LABELLER: "labeller",
}


# Requests -> domain values -------------------------------------------------------------------

def pipeline_spec(request: pb.CreatePipelineRequest) -> domain.PipelineSpec:
    p = request.pipeline
    return domain.PipelineSpec(
        pipeline_id=request.pipeline_id, display_name=p.display_name, type=p.type, class_names=list(p.class_names),
        tile_size=p.tile_size, description=p.description,
        default_hyperparameters=wire.values_of(p.default_hyperparameters), request_id=request.request_id)


def training_set_spec(request: pb.CreateTrainingSetRequest, owner: str = "") -> domain.TrainingSetSpec:
    return domain.TrainingSetSpec(
        owner=owner,
        pipeline=request.pipeline, training_set_id=request.training_set_id, display_name=request.display_name,
        class_names=list(request.class_names), annotations_key=request.annotations_key,
        # An enum number this build does not know stays visible, and is refused naming the field.
        format=FORMATS.get(request.format, f"unknown ({request.format})"),
        tiles=[domain.TileSpec(image_key=t.image_key, annotation_key=t.annotation_key, source_image=t.source_image)
               for t in request.tiles],
        validation_fraction=request.validation_fraction if request.HasField("validation_fraction") else None,
        split_seed=request.split_seed if request.HasField("split_seed") else None,
        instance_class=request.instance_class if request.HasField("instance_class") else None,
        request_id=request.request_id)


def job_spec(request: pb.CreateJobRequest, owner: str = "") -> domain.JobSpec:
    return domain.JobSpec(
        owner=owner,
        pipeline=request.pipeline, training_set=request.training_set, from_model=request.from_model,
        hyperparameters=wire.values_of(request.hyperparameters), pretrained_weights=request.pretrained_weights,
        display_name=request.display_name, request_id=request.request_id,
        processes=request.parallelism.processes, nodes=request.parallelism.nodes)


def analysis_job_spec(request: pb.CreateAnalysisJobRequest, owner: str = "") -> domain.AnalysisJobSpec:
    return domain.AnalysisJobSpec(owner=owner, model=request.model, image_keys=list(request.image_keys),
                                  training_set=request.training_set, pipeline=request.pipeline,
                                  display_name=request.display_name, request_id=request.request_id)


def node_registration(request: pb.RegisterTrainerNodeRequest) -> domain.NodeRegistration:
    return domain.NodeRegistration(node_id=request.node_id, address=request.address, capacity=request.capacity,
                                   device=request.device, job_memory_bytes=request.job_memory_bytes,
                                   max_processes=request.max_processes)


def node_heartbeat(request: pb.HeartbeatTrainerNodeRequest) -> domain.NodeHeartbeat:
    return domain.NodeHeartbeat(name=request.name, jobs=list(request.jobs), draining=request.draining)


# Rows and domain values -> API resources -----------------------------------------------------

def pipeline_message(row: PipelineRow) -> pb.Pipeline:
    stored = hyperparameters.deserialized(row.default_hyperparameters)
    return pb.Pipeline(
        name=names.pipeline(row.id), display_name=row.display_name, type=row.type,  # type: ignore[arg-type]
        class_names=row.class_names, tile_size=row.tile_size,
        default_hyperparameters=wire.message_of(hyperparameters.pipeline_defaults(stored)),
        description=row.description, create_time=to_timestamp(row.create_time),
    )


def architecture_message(entry: catalogue.ArchitectureInfo) -> pb.Architecture:
    return pb.Architecture(name=entry.name, description=entry.description, parameter_count=entry.parameter_count,
                           is_default=entry.name == DEFAULT_ARCHITECTURE)


def upload_message(grant: domain.UploadGrant) -> pb.Upload:
    return pb.Upload(upload_id=grant.upload_id, expire_time=to_timestamp(grant.expire_time),
                     files=[pb.Upload.File(file_name=f.file_name, key=f.key, url=f.url) for f in grant.files])


def training_set_message(row: TrainingSetRow, tiles: list[TileRow] | None = None) -> pb.TrainingSet:
    return pb.TrainingSet(
        name=names.training_set(row.id), display_name=row.display_name, pipeline=names.pipeline(row.pipeline),
        owner=row.owner, class_names=row.class_names, snapshot=row.snapshot, tile_count=row.tile_count,
        train_tile_count=row.train_tile_count, validation_tile_count=row.validation_tile_count,
        tiles=[pb.Tile(name=t.name, image_uri=t.image_uri, mask_uri=t.mask_uri, source_image=t.source_image,
                       width=t.width, height=t.height, validation=t.validation) for t in tiles or []],
        report=pb.ValidationReport.FromString(row.report), validation_fraction=row.validation_fraction,
        split_seed=row.split_seed, create_time=to_timestamp(row.create_time),
        state=row.state, tiles_checked=row.tile_count if row.state == pb.TrainingSet.STATE_READY  # type: ignore[arg-type]
        else row.tiles_checked, failure_reason=row.failure_reason,
        update_time=to_timestamp(row.update_time or row.create_time),
    )


def job_message(row: JobRow) -> pb.Job:
    message = pb.Job(
        name=names.job(row.id), display_name=row.display_name, pipeline=names.pipeline(row.pipeline),
        owner=row.owner,
        training_set=names.training_set(row.training_set), from_model=_optional_model(row.from_model),
        pretrained_weights=row.pretrained_weights,
        hyperparameters=common_pb2.Hyperparameters.FromString(row.hyperparameters),
        state=row.state, failure_reason=row.failure_reason, attempt=row.attempt,  # type: ignore[arg-type]
        progress=common_pb2.Progress.FromString(row.progress),
        trainer_node=names.trainer_node(row.trainer_node) if row.trainer_node else "",
        model=_optional_model(row.model),
        create_time=to_timestamp(row.create_time), start_time=to_timestamp(row.start_time),
        end_time=to_timestamp(row.end_time), update_time=to_timestamp(row.update_time),
        normalization_reason=row.normalization_reason,
        quality_warnings=[common_pb2.QualityWarning(**w) for w in row.quality_warnings],
        parallelism=common_pb2.Parallelism(processes=row.processes, nodes=row.nodes),
        trainer_nodes=[names.trainer_node(n) for n in row.gang_nodes],
    )
    if row.latest_metrics:
        message.latest_metrics.CopyFrom(common_pb2.EpochMetrics.FromString(row.latest_metrics))
    if row.state == common_pb2.JOB_STATE_SUCCEEDED:
        message.progress.percent = 100.0
    return message


def model_message(row: ModelRow) -> pb.Model:
    finished = common_pb2.JobFinished.FromString(row.finished)
    return pb.Model(
        name=names.model(row.id), job=names.job(row.job), pipeline=names.pipeline(row.pipeline), owner=row.owner,
        training_set=names.training_set(row.training_set), training_set_snapshot=row.training_set_snapshot,
        architecture=row.architecture, class_names=row.class_names, tile_size=row.tile_size,
        weights=finished.best_model, final_weights=finished.final_model, best_epoch=finished.best_epoch,
        best_metrics=finished.best_metrics, selection_reason=finished.selection_reason,
        parent_model=_optional_model(row.parent_model),
        environment=dict(finished.environment), create_time=to_timestamp(row.create_time),
        quality_warnings=finished.quality_warnings, normalization=finished.normalization,
    )


def comparison_message(result: domain.Comparison) -> pb.JobComparison:
    series = [pb.JobComparison.Series(
        job=names.job(c.job.id), training_set=names.training_set(c.job.training_set),
        training_set_snapshot=c.training_set_snapshot, from_model=_optional_model(c.job.from_model),
        hyperparameters=common_pb2.Hyperparameters.FromString(c.job.hyperparameters), epochs=c.epochs,
        state=c.job.state,  # type: ignore[arg-type]
    ) for c in result.jobs]
    return pb.JobComparison(
        series=series,
        differences=[pb.JobComparison.Difference(field=d.field, values=d.values) for d in result.differences],
        drift=[pb.JobComparison.Drift(job=d.job, epochs_compared=d.epochs_compared, identical=d.identical,
                                      **{f"max_{k}": v for k, v in d.largest.items()}) for d in result.drift])


def analysis_message(result: domain.Analysis) -> pb.AnalyzeTilesResponse:
    return pb.AnalyzeTilesResponse(
        analysis_id=result.analysis_id, trainer_node=names.trainer_node(result.trainer_node),
        tiles=[pb.TileAnalysis(
            image_key=t.image_key, mask_uri=t.mask_uri, mask_url=t.mask_url, width=t.width, height=t.height,
            classes=[pb.ClassArea(class_index=i, class_name=name, pixel_count=t.class_pixels[i],
                                  fraction=t.class_pixels[i] / max(1, t.width * t.height))
                     for i, name in enumerate(result.class_names)],
        ) for t in result.tiles])


def analysis_job_message(a: domain.AnalysisJob, presign: Callable[[str], str] | None = None) -> pb.AnalysisJob:
    """The analysis job; its results once SUCCEEDED, with download URLs when `presign` is given."""
    job, row = a.job, a.analysis
    message = pb.AnalysisJob(
        name=names.analysis(job.id), pipeline=names.pipeline(job.pipeline), model=names.model(row.model),
        owner=job.owner,
        training_set=names.training_set(row.training_set) if row.training_set else "", tile_count=row.tile_count,
        state=job.state, failure_reason=job.failure_reason, attempt=job.attempt,  # type: ignore[arg-type]
        progress=common_pb2.Progress.FromString(job.progress),
        trainer_node=names.trainer_node(job.trainer_node) if job.trainer_node else "",
        display_name=job.display_name, create_time=to_timestamp(job.create_time),
        start_time=to_timestamp(job.start_time), end_time=to_timestamp(job.end_time),
        update_time=to_timestamp(job.update_time),
    )
    output = common_pb2.AnalysisOutput.FromString(row.output) if row.output else None
    if job.state == common_pb2.JOB_STATE_SUCCEEDED and output is not None:
        message.progress.percent = 100.0
        message.results.CopyFrom(pb.AnalysisResults(
            tiles_analysed=output.tiles_analysed, tiles_failed=output.tiles_failed, classes=output.classes,
            **{field: _result_file(getattr(output, field), presign)
               for field in ("manifest", "tiles_csv", "tiles_json", "classes_csv", "classes_json")}))
    return message


def _result_file(artifact: common_pb2.Artifact, presign: Callable[[str], str] | None) -> pb.ResultFile:
    return pb.ResultFile(uri=artifact.uri, url=presign(artifact.uri) if presign and artifact.uri else "",
                         size_bytes=artifact.size_bytes, sha256=artifact.sha256)


def analysed_tile_message(record: dict[str, Any], presign: Callable[[str], str]) -> pb.TileAnalysis:
    """One record of an analysis's per-tile results (the trainer's pages) as the API's tile."""
    return pb.TileAnalysis(
        tile=record["tile"], image_key=record["image"], mask_uri=record["mask"],
        mask_url=presign(record["mask"]) if record["mask"] else "", width=record["width"], height=record["height"],
        error=record["error"],
        classes=[pb.ClassArea(class_index=c["index"], class_name=c["name"], pixel_count=c["pixels"],
                              fraction=c["fraction"], object_count=c["objects"]) for c in record["classes"]])


def trainer_node_message(row: TrainerNodeRow, jobs: list[str]) -> pb.TrainerNode:
    return pb.TrainerNode(
        name=names.trainer_node(row.id), address=row.address, state=row.state,  # type: ignore[arg-type]
        capacity=row.capacity, jobs=jobs, device=row.device, heartbeat_time=to_timestamp(row.heartbeat_time),
        job_memory_bytes=row.job_memory_bytes, max_processes=row.max_processes,
    )


def _optional_model(model_id: str) -> str:
    return names.model(model_id) if model_id else ""


# Rows -> what a trainer node is sent ------------------------------------------------------------

def model_ref(row: ModelRow) -> trainer_pb2.ModelRef:
    finished = common_pb2.JobFinished.FromString(row.finished)
    return trainer_pb2.ModelRef(name=names.model(row.id), weights_uri=finished.best_model.uri,
                                weights_sha256=row.weights_sha256 or finished.best_model.sha256,
                                architecture=row.architecture, class_names=row.class_names)


def run_analysis_request(a: domain.AnalysisJob, *, model: ModelRow) -> trainer_pb2.RunJobRequest:
    """What a node is sent to run an analysis job's attempt (one process: parallelism 1 x 1)."""
    job = a.job
    return trainer_pb2.RunJobRequest(
        job=names.analysis(job.id), attempt=job.attempt, class_names=model.class_names, tile_size=model.tile_size,
        output_prefix=object_keys.analysis_attempt_prefix(job.id, job.attempt),
        parallelism=common_pb2.Parallelism(processes=1, nodes=1),
        analysis=trainer_pb2.AnalysisTask(model=model_ref(model), inputs_uri=a.analysis.inputs_uri,
                                          tile_count=a.analysis.tile_count),
    )


def run_job_request(job: JobRow, *, training_set: TrainingSetRow, tile_size: int, tiles: list[TileRow],
                    parent: ModelRow | None) -> trainer_pb2.RunJobRequest:
    """What node rank 0 of the attempt is sent (the scheduler sets node_rank and the rendezvous
    for the others)."""
    request = trainer_pb2.RunJobRequest(
        job=names.job(job.id), attempt=job.attempt,
        hyperparameters=common_pb2.Hyperparameters.FromString(job.hyperparameters),
        class_names=training_set.class_names, tile_size=tile_size,
        training_set=names.training_set(training_set.id), training_set_snapshot=training_set.snapshot,
        output_prefix=object_keys.attempt_prefix(job.id, job.attempt), resume_checkpoint_uri=job.checkpoint_uri,
        resume_checkpoint_epoch=job.checkpoint_epoch, pretrained_weights=job.pretrained_weights,
        tiles=[trainer_pb2.TrainingTile(
            name=t.name, image_uri=t.image_uri, mask_uri=t.mask_uri, validation=t.validation,
            measures=trainer_pb2.TileMeasures.FromString(t.measures) if t.measures is not None else None)
            for t in tiles],
        parallelism=common_pb2.Parallelism(processes=job.processes, nodes=job.nodes),
    )
    if parent is not None:
        request.from_model.CopyFrom(model_ref(parent))
    return request
