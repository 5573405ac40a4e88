"""Pipelines: the seeded defaults and user-created ones."""

from __future__ import annotations

from collections.abc import Collection

from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlmodel import Session

from segcore import limits
from services.common import names
from services.common.errors import AlreadyExistsError, FieldViolation, InvalidArgumentError, check
from services.pipeline_svc.domain import PipelineSpec
from services.pipeline_svc.resources import hyperparameters, lookup
from services.pipeline_svc.tables import PipelineRow

DEFAULT_PIPELINE = "segmentation"
ANALYSIS_PIPELINE = "analysis"
TRAINING, ANALYSIS = pb.Pipeline.TYPE_TRAINING, pb.Pipeline.TYPE_ANALYSIS


def seed_pipelines(session: Session) -> None:
    """Creates the out-of-the-box pipelines if missing. They store no overrides: their jobs follow
    the contract's defaults."""
    seeded = [
        PipelineRow(
            id=DEFAULT_PIPELINE, display_name="Default segmentation", type=TRAINING,
            class_names=["background", "foreground"], tile_size=256, default_hyperparameters=b"",
            description="Binary or multi-class semantic segmentation of image tiles "
                        "(training sets may bring their own class map).",
        ),
        PipelineRow(
            id=ANALYSIS_PIPELINE, display_name="Default analysis", type=ANALYSIS,
            class_names=["background", "foreground"], tile_size=256, default_hyperparameters=b"",
            description="Runs a registered model on new tiles.",
        ),
    ]
    for row in seeded:
        if session.get(PipelineRow, row.id) is None:
            session.add(row)


def get_pipeline(session: Session, *, name: str, field: str = "name") -> PipelineRow:
    return lookup.get_by_name(session, table=PipelineRow, collection=names.PIPELINES, name=name, field=field)


def list_pipelines(session: Session, *, page_size: int, page_token: str) -> tuple[list[PipelineRow], str]:
    return lookup.list_page(session, table=PipelineRow, page_size=page_size, page_token=page_token,
                            newest_first=False)


def create_pipeline(session: Session, *, spec: PipelineSpec, architectures: Collection[str]) -> PipelineRow:
    check_pipeline_spec(spec, architectures=architectures)
    previous = lookup.by_request_id(session, table=PipelineRow, request_id=spec.request_id)
    if previous is not None:
        return repeated_pipeline(previous, spec)
    existing = session.get(PipelineRow, spec.pipeline_id)
    if existing is not None:
        if spec.request_id and existing.request_id == spec.request_id:  # committed meanwhile by the same request
            return repeated_pipeline(existing, spec)
        raise AlreadyExistsError(f"{names.pipeline(spec.pipeline_id)} already exists")
    row = PipelineRow(
        id=spec.pipeline_id, display_name=spec.display_name, type=spec.type, class_names=list(spec.class_names),
        tile_size=spec.tile_size,
        # Only what the creator set: unset fields follow the code's defaults when each job is created.
        default_hyperparameters=hyperparameters.serialized(spec.default_hyperparameters),
        description=spec.description, request_id=spec.request_id or None,
    )
    session.add(row)
    return row


def repeated_pipeline(row: PipelineRow, spec: PipelineSpec) -> PipelineRow:
    """The pipeline an earlier request with the same request_id created, if this one asks for the
    same; INVALID_ARGUMENT naming request_id (and what differs) otherwise."""
    differ = [field for field, same in (
        ("pipeline_id", spec.pipeline_id == row.id),
        ("pipeline.display_name", spec.display_name == row.display_name),
        ("pipeline.type", spec.type == row.type),
        ("pipeline.class_names", list(spec.class_names) == list(row.class_names)),
        ("pipeline.tile_size", spec.tile_size == row.tile_size),
        ("pipeline.description", spec.description == row.description),
        ("pipeline.default_hyperparameters", dict(spec.default_hyperparameters) == stored_hyperparameters(row)),
    ) if not same]
    if differ:
        raise InvalidArgumentError.of("request_id", f"already used for {names.pipeline(row.id)}, created with other "
                                                    f"parameters ({', '.join(differ)}); use a new request_id")
    return row


def check_pipeline_spec(spec: PipelineSpec, *, architectures: Collection[str]) -> None:
    v: list[FieldViolation] = []
    if not names.is_valid_id(spec.pipeline_id):
        v.append(FieldViolation("pipeline_id", "1-63 lowercase letters, digits or '-'"))
    if not spec.display_name:
        v.append(FieldViolation("pipeline.display_name", "required"))
    if spec.type not in (TRAINING, ANALYSIS):
        v.append(FieldViolation("pipeline.type", "must be TYPE_TRAINING or TYPE_ANALYSIS"))
    v += class_name_violations(spec.class_names, field="pipeline.class_names")
    if not 32 <= spec.tile_size <= limits.MAX_TILE_SIDE:
        v.append(FieldViolation("pipeline.tile_size", f"must be 32..{limits.MAX_TILE_SIDE}, got {spec.tile_size}"))
    check(v)
    hyperparameters.validate(spec.default_hyperparameters, architectures=architectures,
                             prefix="pipeline.default_hyperparameters")


def class_name_violations(class_names: list[str], *, field: str) -> list[FieldViolation]:
    if len(class_names) < 2:
        return [FieldViolation(field, "need at least 2 classes (index 0 is the background)")]
    if len(class_names) > 255:
        return [FieldViolation(field, "at most 255 classes")]
    if len(set(class_names)) != len(class_names) or any(not c.strip() for c in class_names):
        return [FieldViolation(field, "class names must be unique and non-empty")]
    return []


def stored_hyperparameters(row: PipelineRow) -> dict[str, object]:
    """The overrides the pipeline's creator set (rows created before overrides were stored alone
    hold a full copy of the defaults of their time, which they keep)."""
    return hyperparameters.deserialized(row.default_hyperparameters)
