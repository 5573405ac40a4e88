"""The model registry: a model is registered atomically with its job's success."""

from __future__ import annotations

import re

from segtrain.common.v1 import common_pb2
from sqlmodel import Session

from services.common import names, object_keys
from services.common.errors import FailedPreconditionError
from services.pipeline_svc.resources import hyperparameters, lookup
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TrainingSetRow

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def model_id_for(job_id: str) -> str:
    """One job registers at most one model, under a name derived from the job's."""
    return f"m-{job_id.removeprefix('j-')}"


def get_model(session: Session, *, name: str, field: str = "name", for_update: bool = False) -> ModelRow:
    return lookup.get_by_name(session, table=ModelRow, collection=names.MODELS, name=name, field=field,
                              for_update=for_update)


def weights_keys(model: ModelRow) -> list[str]:
    """The keys of the model's weights (the best epoch's and the last's)."""
    finished = common_pb2.JobFinished.FromString(model.finished)
    return [a.uri for a in (finished.best_model, finished.final_model) if a.uri]


def list_models(session: Session, *, pipeline: str, page_size: int, page_token: str, owner: str = ""
                ) -> tuple[list[ModelRow], str]:
    return lookup.list_page(session, table=ModelRow, pipeline=pipeline, page_size=page_size, page_token=page_token,
                            owner=owner)


def register_model(session: Session, *, job: JobRow, finished: common_pb2.JobFinished) -> ModelRow:
    """Adds the model row (idempotent); the caller commits it together with the job's success.

    The weights must be the ones this attempt writes (a stale attempt's files are never
    registered) and come with their sha256, which every later load checks."""
    existing = session.get(ModelRow, model_id_for(job.id))
    if existing is not None:
        return existing
    _check_artifacts(job, finished)
    training_set = session.get(TrainingSetRow, job.training_set)
    assert training_set is not None  # jobs reference existing sets; sets are never deleted
    pipeline = session.get(PipelineRow, job.pipeline)
    row = ModelRow(
        id=model_id_for(job.id), job=job.id, pipeline=job.pipeline, training_set=job.training_set,
        training_set_snapshot=training_set.snapshot,
        architecture=str(hyperparameters.deserialized(job.hyperparameters).get("architecture", "")),
        class_names=list(training_set.class_names), tile_size=pipeline.tile_size if pipeline else 0,
        finished=finished.SerializeToString(), weights_sha256=finished.best_model.sha256,
        parent_model=job.from_model, owner=job.owner,
    )
    session.add(row)
    job.model = row.id
    return row


def _check_artifacts(job: JobRow, finished: common_pb2.JobFinished) -> None:
    prefix = object_keys.attempt_prefix(job.id, job.attempt)
    for artifact, expected in ((finished.best_model, object_keys.model_weights(prefix, "best")),
                               (finished.final_model, object_keys.model_weights(prefix, "final"))):
        if artifact.uri != expected:
            raise FailedPreconditionError(
                f"the trainer node reported weights at {artifact.uri!r}, not at this attempt's {expected!r}")
        if not _SHA256.match(artifact.sha256):
            raise FailedPreconditionError(f"the trainer node reported {artifact.uri!r} without a valid sha256")
