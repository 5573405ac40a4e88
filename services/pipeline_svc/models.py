"""The model registry: a model is registered atomically with its job's success."""

from __future__ import annotations

import re

from segtrain.common.v1 import common_pb2
from sqlmodel import Session, col, select

from services.common import names, object_keys
from services.common.errors import FailedPreconditionError, NotFoundError
from services.common.pagination import page
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TrainingSetRow


def model_id_for(job_id: str) -> str:
    """One job registers at most one model, under a name derived from the job's."""
    return f"m-{job_id.removeprefix('j-')}"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def register(session: Session, job: JobRow, finished: common_pb2.JobFinished) -> ModelRow:
    """Adds the model row (idempotent); the caller commits it together with the job's success.

    The weights must be the ones this attempt writes (a stale attempt's files are never
    registered) and come with their sha256, which every later load checks."""
    existing = session.get(ModelRow, model_id_for(job.id))
    if existing is not None:
        return existing
    _check_artifacts(job, finished)
    training_set = session.get(TrainingSetRow, job.training_set)
    assert training_set is not None  # jobs reference existing sets; sets are never deleted
    params = common_pb2.Hyperparameters.FromString(job.hyperparameters)

    pipeline = session.get(PipelineRow, job.pipeline)
    row = ModelRow(
        id=model_id_for(job.id), job=job.id, pipeline=job.pipeline, training_set=job.training_set,
        training_set_snapshot=training_set.snapshot, architecture=params.architecture,
        class_names=list(training_set.class_names), tile_size=pipeline.tile_size if pipeline else 0,
        finished=finished.SerializeToString(), weights_sha256=finished.best_model.sha256,
        parent_model=job.from_model,
    )
    session.add(row)
    job.model = row.id
    return row


def _check_artifacts(job: JobRow, finished: common_pb2.JobFinished) -> None:
    prefix = object_keys.attempt_prefix(job.id, job.attempt)
    for artifact, kind in ((finished.best_model, "best"), (finished.final_model, "final")):
        expected = object_keys.model_weights(prefix, kind)  # type: ignore[arg-type]
        if artifact.uri != expected:
            raise FailedPreconditionError(
                f"the trainer node reported {kind} weights at {artifact.uri!r}, not at this attempt's {expected!r}")
        if not _SHA256.match(artifact.sha256):
            raise FailedPreconditionError(f"the trainer node reported {kind} weights without a valid sha256")


def get_row(session: Session, name: str, *, field: str = "name") -> ModelRow:
    model_id = names.parse_name(name, names.MODELS, field=field)
    row = session.get(ModelRow, model_id)
    if row is None:
        raise NotFoundError(names.format_name(names.MODELS, model_id))
    return row


def list_rows(session: Session, pipeline: str, page_size: int, page_token: str) -> tuple[list[ModelRow], str]:
    query = select(ModelRow).order_by(col(ModelRow.create_time).desc(), col(ModelRow.id))
    if pipeline:
        query = query.where(ModelRow.pipeline == names.parse_name(pipeline, names.PIPELINES, field="pipeline"))
    return page(session, query, page_size, page_token)
