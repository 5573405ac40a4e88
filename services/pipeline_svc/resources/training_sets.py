"""Creating immutable, content-hashed training sets from uploaded tiles and formats.

Creation reads and checks every tile before anything is written: a set with fatal problems is
refused naming each tile, and a failure half-way removes what it wrote. Snapshot objects are
content-addressed (services.common.object_keys), so identical content is stored once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from segcore import annotations as formats
from segcore import imaging, intensity, splits
from segcore.errors import InvalidParameterError, InvalidTileError
from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import AlreadyExistsError, FieldViolation, InvalidArgumentError, NotFoundError, check
from services.common.storage import ObjectStore
from services.pipeline_svc.domain import TileSpec, TrainingSetSpec
from services.pipeline_svc.resources import lookup, pipelines
from services.pipeline_svc.tables import TileRow, TrainingSetRow

log = logging.getLogger(__name__)

MAX_TILES = 20_000
MAX_REPORTED = 50
UNLABELLED = 255
SEVERITIES = {formats.ERROR: pb.ValidationIssue.SEVERITY_ERROR,
              formats.WARNING: pb.ValidationIssue.SEVERITY_WARNING}


@dataclass
class _CheckedTile:
    name: str
    source_image: str
    image_bytes: bytes
    image_ext: str
    mask_png: bytes
    width: int
    height: int
    class_pixels: np.ndarray  # pixel count per class index
    profile: intensity.ImageProfile  # pixel type, channels and value range of its image
    issues: list[pb.ValidationIssue]  # warnings found while rendering its annotation


def create_training_set(engine: Engine, store: ObjectStore, *, spec: TrainingSetSpec) -> TrainingSetRow:
    """Reads and checks every tile, then writes the snapshot's objects and the set's rows; on any
    failure nothing it wrote is left behind. It takes the engine, not a session: reading the
    tiles and writing the objects happen between two short transactions, never inside one."""
    with session_scope(engine) as session:
        previous = lookup.by_request_id(session, table=TrainingSetRow, request_id=spec.request_id)
        if previous is not None:
            return previous
        pipeline = pipelines.get_pipeline(session, name=spec.pipeline, field="pipeline")
    class_names = list(spec.class_names) or list(pipeline.class_names)
    _check_spec(spec, class_names)
    tiles, warnings = _read_and_check(store, spec, class_names, tile_size=pipeline.tile_size)
    snapshot = _snapshot_hash(tiles, class_names)
    set_id = spec.training_set_id or f"ts-{snapshot.removeprefix('sha256:')[:12]}"
    fraction = spec.validation_fraction if spec.validation_fraction is not None else 0.2
    seed = spec.split_seed if spec.split_seed is not None else 0
    validation = _split(tiles, fraction, seed)
    report = _report(tiles, validation, class_names, warnings)
    with session_scope(engine) as session:
        existing = session.get(TrainingSetRow, set_id)
        if existing is not None:
            if (existing.snapshot, existing.split_seed, existing.validation_fraction) == (snapshot, seed, fraction):
                return existing  # the same content again: recognised, not duplicated
            raise AlreadyExistsError(f"{names.training_set(set_id)} already exists with different content")
    written = _write_snapshot(store, snapshot, tiles)
    try:
        with session_scope(engine) as session:
            row = TrainingSetRow(
                id=set_id, display_name=spec.display_name or set_id, pipeline=pipeline.id,
                class_names=class_names, snapshot=snapshot, tile_count=len(tiles),
                train_tile_count=len(tiles) - len(validation), validation_tile_count=len(validation),
                validation_fraction=fraction, split_seed=seed, report=report.SerializeToString(),
                request_id=spec.request_id or None,
            )
            session.add(row)
            session.flush()
            for t in tiles:
                session.add(TileRow(
                    training_set=set_id, name=t.name, source_image=t.source_image,
                    image_uri=object_keys.snapshot_image(snapshot, t.name, t.image_ext),
                    mask_uri=object_keys.snapshot_mask(snapshot, t.name),
                    width=t.width, height=t.height, validation=t.name in validation,
                ))
        return row
    except IntegrityError:
        _undo(engine, store, snapshot, written)
        raise AlreadyExistsError(f"{names.training_set(set_id)} was created concurrently") from None
    except BaseException:
        _undo(engine, store, snapshot, written)
        raise


def _undo(engine: Engine, store: ObjectStore, snapshot: str, written: list[str]) -> None:
    """Removes the objects this call wrote, unless a concurrent set with the same content uses them."""
    with session_scope(engine) as session:
        shared = session.exec(select(TrainingSetRow.id).where(TrainingSetRow.snapshot == snapshot)).first()
    if shared is None:
        store.delete_many(written)


def get_training_set(session: Session, *, name: str, field: str = "name") -> TrainingSetRow:
    return lookup.get_by_name(session, table=TrainingSetRow, collection=names.TRAINING_SETS, name=name, field=field)


def tiles_of(session: Session, *, set_id: str) -> list[TileRow]:
    return list(session.exec(select(TileRow).where(TileRow.training_set == set_id).order_by(col(TileRow.name))))


def list_training_sets(session: Session, *, pipeline: str, page_size: int, page_token: str
                       ) -> tuple[list[TrainingSetRow], str]:
    return lookup.list_page(session, table=TrainingSetRow, pipeline=pipeline, page_size=page_size,
                            page_token=page_token)


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


def _read_and_check(store: ObjectStore, spec: TrainingSetSpec, class_names: list[str], *, tile_size: int
                    ) -> tuple[list[_CheckedTile], list[pb.ValidationIssue]]:
    """Every tile decoded and checked (no larger than the pipeline's tile size: admission and the
    models' analysis windows count on it), its annotation rendered."""
    fmt = spec.format
    collection = _collection(store, spec, class_names)

    def one(i: int) -> _CheckedTile | list[FieldViolation]:
        tile = spec.tiles[i]
        name = PurePosixPath(tile.image_key).stem
        try:
            image_bytes = store.get(tile.image_key)
            annotation = store.get(tile.annotation_key) if tile.annotation_key else None
        except NotFoundError as exc:
            return [FieldViolation(f"tiles[{i}]", f"tile {name!r}: {exc.message}")]
        try:
            image = imaging.decode_image(image_bytes, name)
            height, width = image.shape[:2]
            if max(height, width) > tile_size:
                return [FieldViolation(f"tiles[{i}]", f"tile {name!r} is {width}x{height}, larger than the pipeline's "
                                       f"tile size {tile_size}: cut it into tiles of at most {tile_size}x{tile_size}, "
                                       "or use a pipeline with a larger tile size")]
            rendered = (collection.render(tile=name, width=width, height=height) if collection is not None
                        else formats.render_tile(fmt, annotation, tile=name, width=width, height=height,
                                                     class_names=class_names,
                                                     instance_class=spec.instance_class or 1))
        except InvalidTileError as exc:
            return [FieldViolation(f"tiles[{i}]", f"tile {exc.tile!r}: {exc.reason}")]
        if rendered.has_errors:
            return [FieldViolation(f"tiles[{i}]", f"tile {name!r}: {issue.message}")
                    for issue in rendered.issues if issue.severity == formats.ERROR]
        return _checked(name, tile, image_bytes, image, rendered, len(class_names))

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="tile-check") as pool:
        results = list(pool.map(one, range(len(spec.tiles))))
    check([v for r in results if isinstance(r, list) for v in r][:MAX_REPORTED])
    tiles = [r for r in results if isinstance(r, _CheckedTile)]
    issues = [issue for t in tiles for issue in t.issues]
    if collection is not None:
        issues += [_issue(i) for i in collection.issues + collection.unmatched(t.name for t in tiles)]
    return tiles, issues


def _collection(store: ObjectStore, spec: TrainingSetSpec, class_names: list[str]
                ) -> formats.AnnotationCollection | None:
    if not spec.annotations_key:
        return None
    try:
        collection = formats.load_collection(spec.format, store.get(spec.annotations_key), class_names)
    except NotFoundError as exc:
        raise InvalidArgumentError.of("annotations_key", exc.message) from None
    except InvalidParameterError as exc:
        raise InvalidArgumentError.of("annotations_key", exc.reason) from None
    check([FieldViolation("annotations_key", i.message) for i in collection.issues
           if i.severity == formats.ERROR][:MAX_REPORTED])
    return collection


def _issue(issue: formats.AnnotationIssue) -> pb.ValidationIssue:
    return pb.ValidationIssue(severity=SEVERITIES[issue.severity], code=issue.code, tile=issue.tile,
                              message=issue.message)


def _checked(name: str, tile: TileSpec, image_bytes: bytes, image: np.ndarray, rendered: formats.Rendered,
             num_classes: int) -> _CheckedTile:
    mask = rendered.mask
    labelled = mask[mask != UNLABELLED]
    return _CheckedTile(
        name=name, source_image=tile.source_image or name, image_bytes=image_bytes,
        image_ext=PurePosixPath(tile.image_key).suffix.lower(), mask_png=imaging.encode_mask_png(mask),
        width=int(image.shape[1]), height=int(image.shape[0]),
        class_pixels=np.bincount(labelled.ravel().astype(np.int64), minlength=num_classes)[:num_classes],
        profile=intensity.profile_image(image),
        issues=[_issue(i) for i in rendered.issues],
    )


def _snapshot_hash(tiles: list[_CheckedTile], class_names: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(class_names).encode())
    for t in sorted(tiles, key=lambda t: t.name):
        digest.update(json.dumps([
            t.name, t.source_image, hashlib.sha256(t.image_bytes).hexdigest(), hashlib.sha256(t.mask_png).hexdigest(),
        ]).encode())
    return f"sha256:{digest.hexdigest()}"


def _split(tiles: list[_CheckedTile], fraction: float, seed: int) -> set[str]:
    try:
        result = splits.split_train_val(
            [t.name for t in tiles], seed=seed, val_fraction=fraction, groups=[t.source_image for t in tiles],
            labels_present=[{int(c) for c in np.nonzero(t.class_pixels)[0]} for t in tiles],
        )
    except InvalidParameterError as exc:
        raise InvalidArgumentError.of(exc.field, exc.reason) from None
    return set(result.val)


def _report(tiles: list[_CheckedTile], validation: set[str], class_names: list[str],
            warnings: list[pb.ValidationIssue]) -> pb.ValidationReport:
    totals = np.sum([t.class_pixels for t in tiles], axis=0)
    classes = [
        pb.ClassStatistics(
            class_index=i, class_name=name, pixel_count=int(totals[i]),
            tile_count=sum(1 for t in tiles if t.class_pixels[i] > 0),
            validation_tile_count=sum(1 for t in tiles if t.class_pixels[i] > 0 and t.name in validation),
        )
        for i, name in enumerate(class_names)
    ]
    issues = list(warnings)
    for stats in classes[1:]:
        if stats.pixel_count == 0:
            issues.append(pb.ValidationIssue(severity=pb.ValidationIssue.SEVERITY_WARNING, code="CLASS_ABSENT",
                                             message=f"class {stats.class_name!r} has no annotated pixel"))
        elif stats.validation_tile_count == 0:
            issues.append(pb.ValidationIssue(
                severity=pb.ValidationIssue.SEVERITY_WARNING, code="CLASS_NOT_IN_VALIDATION",
                message=f"class {stats.class_name!r} does not appear in the validation split"))
    profile = intensity.profile_images([])
    for t in tiles:
        profile = profile.merged(t.profile)
    return pb.ValidationReport(classes=classes, issues=issues, image_profile=pb.ImageProfile(
        pixel_types=profile.pixel_types, single_channel=profile.single_channel, min_value=profile.min_value,
        max_value=profile.max_value, recorded=True))


def image_profile(row: TrainingSetRow) -> intensity.ImageProfile | None:
    """What the set's images are made of; None for sets created before profiles were recorded."""
    p = pb.ValidationReport.FromString(row.report).image_profile
    if not p.recorded:
        return None
    return intensity.ImageProfile(pixel_types=tuple(p.pixel_types), single_channel=p.single_channel,
                                  min_value=p.min_value, max_value=p.max_value)


def _put(store: ObjectStore, key: str, data: bytes) -> str:
    store.put(key, data)
    return key


def _write_snapshot(store: ObjectStore, snapshot: str, tiles: list[_CheckedTile]) -> list[str]:
    """Writes the snapshot's objects that are not there yet; returns the keys written."""
    existing = set(store.list_keys(object_keys.snapshot_prefix(snapshot)))
    uploads = [(object_keys.snapshot_image(snapshot, t.name, t.image_ext), t.image_bytes) for t in tiles]
    uploads += [(object_keys.snapshot_mask(snapshot, t.name), t.mask_png) for t in tiles]
    todo = [(k, data) for k, data in uploads if k not in existing]
    written: list[str] = []
    try:
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="snapshot") as pool:
            for key in pool.map(lambda kv: _put(store, *kv), todo):
                written.append(key)
    except BaseException:
        store.delete_many([k for k, _ in todo])
        raise
    return written
