"""Pipelines (the seeded defaults and user-created ones) and the architecture catalogue."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common import names
from services.common.database import session_scope
from services.common.errors import AlreadyExistsError, FieldViolation, NotFoundError, check
from services.common.pagination import page
from services.pipeline_svc import hyperparameters
from services.pipeline_svc.tables import PipelineRow

DEFAULT_PIPELINE = "segmentation"


@dataclass(frozen=True)
class ArchitectureEntry:
    name: str
    description: str
    parameter_count: int


class Architectures:
    """The training core's registry, imported lazily: it pulls in torch and transformers (seconds),
    which the pipeline service needs only for listing and validating names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[ArchitectureEntry] | None = None

    def warm_up(self) -> None:
        threading.Thread(target=self.entries, name="architectures-warm-up", daemon=True).start()

    def entries(self) -> list[ArchitectureEntry]:
        with self._lock:
            if self._entries is None:
                from segcore import architectures

                self._entries = [
                    ArchitectureEntry(a.name, a.description, a.parameter_count)
                    for a in architectures.list_architectures()
                ]
            return self._entries

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]


def seed_defaults(engine: Engine) -> None:
    """Creates the out-of-the-box pipelines if missing. They store no overrides: their jobs follow
    the contract's defaults."""
    defaults = b""
    seeded = [
        PipelineRow(
            id=DEFAULT_PIPELINE, display_name="Default segmentation", type=pb.Pipeline.TYPE_TRAINING,
            class_names=["background", "foreground"], tile_size=256, default_hyperparameters=defaults,
            description="Binary or multi-class semantic segmentation of image tiles "
                        "(training sets may bring their own class map).",
        ),
        PipelineRow(
            id="analysis", display_name="Default analysis", type=pb.Pipeline.TYPE_ANALYSIS,
            class_names=["background", "foreground"], tile_size=256, default_hyperparameters=defaults,
            description="Runs a registered model on new tiles.",
        ),
    ]
    with session_scope(engine) as session:
        for row in seeded:
            if session.get(PipelineRow, row.id) is None:
                session.add(row)


def get_row(session: Session, name: str, *, field: str = "name") -> PipelineRow:
    pipeline_id = names.parse_name(name, names.PIPELINES, field=field)
    row = session.get(PipelineRow, pipeline_id)
    if row is None:
        raise NotFoundError(names.format_name(names.PIPELINES, pipeline_id))
    return row


def list_rows(session: Session, page_size: int, page_token: str) -> tuple[list[PipelineRow], str]:
    query = select(PipelineRow).order_by(col(PipelineRow.create_time), col(PipelineRow.id))
    return page(session, query, page_size, page_token)


def create(engine: Engine, request: pb.CreatePipelineRequest, architectures: Architectures) -> PipelineRow:
    p = request.pipeline
    v: list[FieldViolation] = []
    if not names.is_valid_id(request.pipeline_id):
        v.append(FieldViolation("pipeline_id", "1-63 lowercase letters, digits or '-'"))
    if not p.display_name:
        v.append(FieldViolation("pipeline.display_name", "required"))
    if p.type not in (pb.Pipeline.TYPE_TRAINING, pb.Pipeline.TYPE_ANALYSIS):
        v.append(FieldViolation("pipeline.type", "must be TYPE_TRAINING or TYPE_ANALYSIS"))
    v += class_name_violations(list(p.class_names), "pipeline.class_names")
    if not 32 <= p.tile_size <= 8192:
        v.append(FieldViolation("pipeline.tile_size", f"must be 32..8192, got {p.tile_size}"))
    check(v)
    hyperparameters.validate(p.default_hyperparameters, architectures.names(),
                             prefix="pipeline.default_hyperparameters")
    with session_scope(engine) as session:
        if request.request_id:
            previous = session.exec(select(PipelineRow).where(PipelineRow.request_id == request.request_id)).first()
            if previous is not None:
                return previous
        if session.get(PipelineRow, request.pipeline_id) is not None:
            raise AlreadyExistsError(f"{names.pipeline(request.pipeline_id)} already exists")
        row = PipelineRow(
            id=request.pipeline_id, display_name=p.display_name, type=p.type, class_names=list(p.class_names),
            tile_size=p.tile_size,
            # Only what the creator set: unset fields follow the code's defaults when each job is created.
            default_hyperparameters=p.default_hyperparameters.SerializeToString(),
            description=p.description, request_id=request.request_id or None,
        )
        session.add(row)
    return row


def class_name_violations(class_names: list[str], field: str) -> list[FieldViolation]:
    if len(class_names) < 2:
        return [FieldViolation(field, "need at least 2 classes (index 0 is the background)")]
    if len(class_names) > 255:
        return [FieldViolation(field, "at most 255 classes")]
    if len(set(class_names)) != len(class_names) or any(not c.strip() for c in class_names):
        return [FieldViolation(field, "class names must be unique and non-empty")]
    return []


def stored_hyperparameters(row: PipelineRow) -> common_pb2.Hyperparameters:
    """The overrides the pipeline's creator set (rows created before overrides were stored alone
    hold a full copy of the defaults of their time, which they keep)."""
    return common_pb2.Hyperparameters.FromString(row.default_hyperparameters)
