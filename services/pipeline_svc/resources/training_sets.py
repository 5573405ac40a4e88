"""Training sets: immutable, checked tile sets with a persisted split, created as a long-running
operation (AIP-151 style: the resource carries its state).

`create_training_set` checks the request itself (keys, class names, counts, format) and records
the set PREPARING with its spec; nothing is read from storage on the request's path. The set's
tiles are then decoded, checked and stored off the request by `set_preparation.prepare` (run by
the runtime's preparer), and the set ends READY or FAILED. A repeated request names the same set:
its id is given, or derived from the request's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import PurePosixPath

from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from segcore import annotations as formats
from segcore import intensity
from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    check,
)
from services.common.timeutil import utcnow
from services.pipeline_svc.domain import TileSpec, TrainingSetSpec
from services.pipeline_svc.resources import lookup, pipelines
from services.pipeline_svc.tables import TileRow, TrainingSetRow

MAX_TILES = 20_000
MAX_REPORTED = 50
PREPARING, READY, FAILED = (pb.TrainingSet.STATE_PREPARING, pb.TrainingSet.STATE_READY,
                            pb.TrainingSet.STATE_FAILED)
# What names a set's content: everything but the labels a caller attaches to the request.
_NOT_CONTENT = ("display_name", "request_id", "owner")


def create_training_set(engine: Engine, *, spec: TrainingSetSpec) -> tuple[TrainingSetRow, bool]:
    """The set `spec` names, recorded PREPARING if it is new (or FAILED before: prepared again);
    with whether there is preparation to do. ALREADY_EXISTS when its id names another request's set."""
    with session_scope(engine) as session:
        pipeline = pipelines.get_pipeline(session, name=spec.pipeline, field="pipeline")
    class_names = list(spec.class_names) or list(pipeline.class_names)
    _check_spec(spec, class_names)
    spec = dataclasses.replace(spec, pipeline=pipeline.id, class_names=class_names)
    content = _content_hash(spec)
    with session_scope(engine) as session:
        previous = lookup.by_request_id(session, table=TrainingSetRow, request_id=spec.request_id)
        if previous is not None:
            if _asked_for(spec_of(previous)) != _asked_for(spec) or spec.training_set_id not in ("", previous.id):
                raise InvalidArgumentError.of(
                    "request_id", f"already used for {names.training_set(previous.id)}, created from other "
                                  "parameters; use a new request_id")
            return previous, False
    set_id = spec.training_set_id or f"ts-{content.removeprefix('sha256:')[:12]}"
    try:
        with session_scope(engine) as session:
            existing = session.get(TrainingSetRow, set_id, with_for_update=True)
            if existing is not None:
                return _repeated(existing, content), existing.state == PREPARING
            row = TrainingSetRow(
                id=set_id, display_name=spec.display_name or set_id, pipeline=pipeline.id, class_names=class_names,
                state=PREPARING, spec=json.dumps(dataclasses.asdict(spec)).encode(), spec_hash=content,
                tile_count=len(spec.tiles),
                validation_fraction=spec.validation_fraction if spec.validation_fraction is not None else 0.2,
                split_seed=spec.split_seed if spec.split_seed is not None else 0,
                request_id=spec.request_id or None, owner=spec.owner)
            session.add(row)
        return row, True
    except IntegrityError:  # created concurrently: the same request, or another one's id
        with session_scope(engine) as session:
            existing = session.get(TrainingSetRow, set_id)
            if existing is None:
                raise AlreadyExistsError(f"{names.training_set(set_id)} was created concurrently") from None
            return _repeated(existing, content), False


def _repeated(existing: TrainingSetRow, content: str) -> TrainingSetRow:
    """The set a repeated request names; a FAILED one starts preparing again (its failure may have
    been the store's, and an unchanged request can only fail the same way otherwise)."""
    if existing.spec_hash != content:
        raise AlreadyExistsError(f"{names.training_set(existing.id)} already exists, created from another request")
    if existing.state == FAILED:
        existing.state, existing.tiles_checked, existing.failure_reason = PREPARING, 0, ""
        existing.report, existing.update_time = b"", utcnow()
    return existing


def spec_of(row: TrainingSetRow) -> TrainingSetSpec:
    """The request a set is prepared from, as `create_training_set` recorded it."""
    fields = json.loads(row.spec)
    fields["tiles"] = [TileSpec(**t) for t in fields["tiles"]]
    return TrainingSetSpec(**fields)


def _asked_for(spec: TrainingSetSpec) -> str:
    """What a request asks for, as far as its request_id vouches: its parameters and its files by
    name. A retried upload lands under new keys (another upload id) for the same files, so the
    folders of the keys do not count."""
    def named(key: str) -> str:
        return PurePosixPath(key).name if key else ""

    asked = dataclasses.replace(spec, display_name="", request_id="", owner="", tiles=[
        TileSpec(image_key=named(t.image_key), annotation_key=named(t.annotation_key), source_image=t.source_image)
        for t in spec.tiles], annotations_key=named(spec.annotations_key))
    return hashlib.sha256(json.dumps(dataclasses.asdict(asked), sort_keys=True).encode()).hexdigest()


def _content_hash(spec: TrainingSetSpec) -> str:
    content = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_CONTENT}
    return f"sha256:{hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()}"


def preparing(session: Session) -> list[str]:
    """Ids of the sets still PREPARING, oldest first (a restarted service picks them up again)."""
    return list(session.exec(select(TrainingSetRow.id).where(TrainingSetRow.state == PREPARING)
                             .order_by(col(TrainingSetRow.create_time))))


def get_training_set(session: Session, *, name: str, field: str = "name") -> TrainingSetRow:
    return lookup.get_by_name(session, table=TrainingSetRow, collection=names.TRAINING_SETS, name=name, field=field)


def ready_training_set(session: Session, *, name: str, field: str, for_update: bool = False) -> TrainingSetRow:
    """The set, if it is READY: FAILED_PRECONDITION naming `field` while it prepares or if it failed.
    `for_update`: locked until the transaction ends (a job about to use it: no delete meanwhile)."""
    row = lookup.get_by_name(session, table=TrainingSetRow, collection=names.TRAINING_SETS, name=name, field=field,
                             for_update=for_update)
    if row.state == PREPARING:
        raise FailedPreconditionError(
            f"{field}: {names.training_set(row.id)} is still being prepared ({row.tiles_checked} of "
            f"{row.tile_count} tiles checked); wait until it is READY")
    if row.state != READY:
        raise FailedPreconditionError(f"{field}: {names.training_set(row.id)} FAILED: {row.failure_reason}")
    return row


def tiles_of(session: Session, *, set_id: str) -> list[TileRow]:
    return list(session.exec(select(TileRow).where(TileRow.training_set == set_id).order_by(col(TileRow.name))))


def list_training_sets(session: Session, *, pipeline: str, page_size: int, page_token: str, owner: str = ""
                       ) -> tuple[list[TrainingSetRow], str]:
    return lookup.list_page(session, table=TrainingSetRow, pipeline=pipeline, page_size=page_size,
                            page_token=page_token, owner=owner)


def image_profile(row: TrainingSetRow) -> intensity.ImageProfile | None:
    """What the set's images are made of; None for sets created before profiles were recorded."""
    p = pb.ValidationReport.FromString(row.report).image_profile
    if not p.recorded:
        return None
    return intensity.ImageProfile(pixel_types=tuple(p.pixel_types), single_channel=p.single_channel,
                                  min_value=p.min_value, max_value=p.max_value)


def _check_spec(spec: TrainingSetSpec, class_names: list[str]) -> None:
    v: list[FieldViolation] = []
    if spec.training_set_id and not names.is_valid_id(spec.training_set_id):
        v.append(FieldViolation("training_set_id", "1-63 lowercase letters, digits or '-'"))
    v += pipelines.class_name_violations(class_names, field="class_names")
    if not spec.tiles:
        v.append(FieldViolation("tiles", "a training set needs at least one tile"))
    if len(spec.tiles) > MAX_TILES:
        v.append(FieldViolation("tiles", f"at most {MAX_TILES} tiles"))
    v += _format_violations(spec)
    if spec.instance_class is not None and not 1 <= spec.instance_class < len(class_names):
        v.append(FieldViolation("instance_class", f"must be a class index in 1..{len(class_names) - 1}"))
    if spec.validation_fraction is not None and not 0.05 <= spec.validation_fraction <= 0.5:
        v.append(FieldViolation("validation_fraction", "must be between 0.05 and 0.5"))
    v += _tile_violations(spec.tiles, collection=bool(spec.annotations_key))
    check(v[:MAX_REPORTED])


def _format_violations(spec: TrainingSetSpec) -> list[FieldViolation]:
    """The format's own problem, if any, and the annotations key's (both are reported)."""
    v: list[FieldViolation] = []
    collection = bool(spec.annotations_key)
    if spec.format not in formats.FORMATS:
        v.append(FieldViolation("format", "unknown annotation format"))
    elif collection and spec.format not in formats.COLLECTION_FORMATS:
        v.append(FieldViolation("annotations_key", f"{spec.format} annotations come one file per tile"))
    elif not collection and spec.format == "coco":
        v.append(FieldViolation("annotations_key", "COCO annotations come in one file: set annotations_key"))
    if collection:
        try:
            object_keys.check_upload_key(spec.annotations_key, field="annotations_key")
        except InvalidArgumentError as exc:
            v += exc.violations
    return v


def _tile_violations(tiles: list[TileSpec], *, collection: bool) -> list[FieldViolation]:
    v: list[FieldViolation] = []
    seen: set[str] = set()
    for i, tile in enumerate(tiles):
        keys = [("image_key", tile.image_key)]
        if tile.annotation_key or not collection:
            keys.append(("annotation_key", tile.annotation_key))
        for field, key in keys:
            try:
                object_keys.check_upload_key(key, field=f"tiles[{i}].{field}")
            except InvalidArgumentError as exc:
                v += exc.violations
        stem = PurePosixPath(tile.image_key).stem
        if stem in seen:
            v.append(FieldViolation(f"tiles[{i}].image_key", f"duplicate tile name {stem!r}"))
        seen.add(stem)
    return v
