"""Rows of the pipeline service's tables -> protobuf resources."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from services.common import names
from services.common.timeutil import to_timestamp
from services.pipeline_svc import hyperparameters
from services.pipeline_svc.tables import (
    JobRow,
    ModelRow,
    PipelineRow,
    TileRow,
    TrainerNodeRow,
    TrainingSetRow,
)


def pipeline(row: PipelineRow) -> pb.Pipeline:
    return pb.Pipeline(
        name=names.pipeline(row.id), display_name=row.display_name, type=row.type,  # type: ignore[arg-type]
        class_names=row.class_names, tile_size=row.tile_size,
        default_hyperparameters=hyperparameters.pipeline_defaults(
            common_pb2.Hyperparameters.FromString(row.default_hyperparameters)),
        description=row.description, create_time=to_timestamp(row.create_time),
    )


def training_set(row: TrainingSetRow, tiles: list[TileRow] | None = None) -> pb.TrainingSet:
    return pb.TrainingSet(
        name=names.training_set(row.id), display_name=row.display_name, pipeline=names.pipeline(row.pipeline),
        class_names=row.class_names, snapshot=row.snapshot, tile_count=row.tile_count,
        train_tile_count=row.train_tile_count, validation_tile_count=row.validation_tile_count,
        tiles=[pb.Tile(name=t.name, image_uri=t.image_uri, mask_uri=t.mask_uri, source_image=t.source_image,
                       width=t.width, height=t.height, validation=t.validation) for t in tiles or []],
        report=pb.ValidationReport.FromString(row.report), validation_fraction=row.validation_fraction,
        split_seed=row.split_seed, create_time=to_timestamp(row.create_time),
    )


def job(row: JobRow) -> pb.Job:
    message = pb.Job(
        name=names.job(row.id), display_name=row.display_name, pipeline=names.pipeline(row.pipeline),
        training_set=names.training_set(row.training_set),
        from_model=names.model(row.from_model) if row.from_model else "", pretrained_weights=row.pretrained_weights,
        hyperparameters=common_pb2.Hyperparameters.FromString(row.hyperparameters),
        state=row.state, failure_reason=row.failure_reason, attempt=row.attempt,  # type: ignore[arg-type]
        progress=common_pb2.Progress.FromString(row.progress),
        trainer_node=names.trainer_node(row.trainer_node) if row.trainer_node else "",
        model=names.model(row.model) if row.model else "",
        create_time=to_timestamp(row.create_time), start_time=to_timestamp(row.start_time),
        end_time=to_timestamp(row.end_time), update_time=to_timestamp(row.update_time),
        normalization_reason=row.normalization_reason,
        quality_warnings=[common_pb2.QualityWarning(**w) for w in row.quality_warnings],
    )
    if row.latest_metrics:
        message.latest_metrics.CopyFrom(common_pb2.EpochMetrics.FromString(row.latest_metrics))
    if row.state == common_pb2.JOB_STATE_SUCCEEDED:
        message.progress.percent = 100.0
    return message


def model(row: ModelRow) -> pb.Model:
    finished = common_pb2.JobFinished.FromString(row.finished)
    return pb.Model(
        name=names.model(row.id), job=names.job(row.job), pipeline=names.pipeline(row.pipeline),
        training_set=names.training_set(row.training_set), training_set_snapshot=row.training_set_snapshot,
        architecture=row.architecture, class_names=row.class_names, tile_size=row.tile_size,
        weights=finished.best_model, final_weights=finished.final_model, best_epoch=finished.best_epoch,
        best_metrics=finished.best_metrics, selection_reason=finished.selection_reason,
        parent_model=names.model(row.parent_model) if row.parent_model else "",
        environment=dict(finished.environment), create_time=to_timestamp(row.create_time),
        quality_warnings=finished.quality_warnings, normalization=finished.normalization,
    )


def trainer_node(row: TrainerNodeRow, jobs: list[str]) -> pb.TrainerNode:
    return pb.TrainerNode(
        name=names.trainer_node(row.id), address=row.address, state=row.state,  # type: ignore[arg-type]
        capacity=row.capacity, jobs=jobs, device=row.device, heartbeat_time=to_timestamp(row.heartbeat_time),
    )
