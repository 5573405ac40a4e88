"""Preparing a training set: every tile read, decoded (Pillow/tifffile: no torch here), checked,
its annotation rendered, and its image and mask stored under the set's own prefix.

Memory does not grow with the set: tiles stream through a few threads, a bounded window of them
at a time, and only small facts about each are kept (names, keys, sizes, class pixel counts,
value range, digests, and its normalization measures: trainers then neither read nor check a tile
before training, see segtrain.trainer.v1.TileMeasures). What the threads hold at once is bounded
too, in bytes, across every set being prepared (`MemoryBudget`): a pipeline with large tiles
prepares fewer of them at a time.
Progress is written as it goes. At the end the split, the report, the tile rows and the snapshot
hash are written in one transaction that also makes the set READY; any unusable tile makes it
FAILED instead, naming each (up to 50), and removes what it stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

import numpy as np
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import col

from segcore import annotations as formats
from segcore import imaging, intensity, limits, splits
from segcore.errors import InvalidParameterError, InvalidTileError, TileTooLargeError
from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import NotFoundError, UnavailableError
from services.common.storage import ObjectStore, ObjectTooLargeError
from services.common.timeutil import utcnow
from services.pipeline_svc.domain import TrainingSetSpec
from services.pipeline_svc.resources import hyperparameters, pipelines
from services.pipeline_svc.resources.training_sets import FAILED, MAX_REPORTED, PREPARING, READY, spec_of
from services.pipeline_svc.tables import TileRow, TrainingSetRow

log = logging.getLogger(__name__)

UNLABELLED = 255
MAX_WARNINGS = 1_000  # listed in a report; the rest are counted
PROGRESS_INTERVAL_S = 0.5
SEVERITIES = {formats.ERROR: pb.ValidationIssue.SEVERITY_ERROR,
              formats.WARNING: pb.ValidationIssue.SEVERITY_WARNING}
ERROR = pb.ValidationIssue.SEVERITY_ERROR
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Tuning:
    threads: int = 8  # tiles decoded and stored at once
    window: int = 16  # tiles in flight (submitted, not yet consumed): what bounds memory
    memory_bytes: int = 1 << 30  # what the tiles being checked may hold at once (MemoryBudget)


DEFAULT_TUNING = Tuning()
# Bytes per pixel a tile may take while it is checked: its decoded image (up to 4 channels of 8
# bytes), its rendered annotation and mask.
_BYTES_PER_PIXEL = 48
# What an image file may hold beyond its pixels (headers, metadata, thumbnails).
_FILE_SLACK = 16 << 20


class MemoryBudget:
    """Bytes the tiles being checked hold at once. A tile reserves what it may need before its
    objects are read (the most a tile of the pipeline's size can take) and keeps what it needs
    once their sizes and its header are known. A tile that needs more than the whole budget
    waits until it can run alone. `peak` is the most ever reserved at once."""

    def __init__(self, total: int) -> None:
        self.total, self.peak = total, 0
        self._used = 0
        self._changed = threading.Condition()

    def reserve(self, wanted: int) -> int:
        """Waits for `wanted` bytes (at most the whole budget); returns what it reserved."""
        wanted = min(wanted, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self._used + wanted <= self.total)
            self._used += wanted
            self.peak = max(self.peak, self._used)
        return wanted

    def release(self, amount: int) -> None:
        with self._changed:
            self._used -= amount
            self._changed.notify_all()

    @contextlib.contextmanager
    def reserved(self, wanted: int) -> Iterator[_Held]:
        held = _Held(self, self.reserve(wanted))
        try:
            yield held
        finally:
            self.release(held.amount)


@dataclass
class _Held:
    budget: MemoryBudget
    amount: int

    def keep(self, needed: int) -> None:
        """Gives back what is reserved beyond `needed`."""
        if needed < self.amount:
            self.budget.release(self.amount - needed)
            self.amount = needed


def image_bytes_limit(tile_size: int) -> int:
    """The largest image file a tile of at most tile_size² pixels can need."""
    return min(limits.MAX_IMAGE_BYTES, tile_size * tile_size * 8 * 4 + _FILE_SLACK)


@dataclass
class _Tile:
    """What is kept of one checked and stored tile (a few hundred bytes)."""

    name: str
    source_image: str
    image_uri: str
    mask_uri: str
    width: int
    height: int
    digests: tuple[str, str]  # sha256 of the image bytes and of the mask PNG
    class_pixels: np.ndarray  # pixel count per class index
    measures: bytes  # a serialized segtrain.trainer.v1.TileMeasures
    profile: intensity.ImageProfile
    warnings: list[pb.ValidationIssue]


class _Failed(Exception):
    """The set cannot be used: the reason, and the issues that say why."""

    def __init__(self, reason: str, issues: Sequence[pb.ValidationIssue] = ()) -> None:
        super().__init__(reason)
        self.reason, self.issues = reason, list(issues)


def prepare(engine: Engine, store: ObjectStore, set_id: str, *, stopping: threading.Event,
            tuning: Tuning = DEFAULT_TUNING, budget: MemoryBudget | None = None) -> None:
    """Prepares one PREPARING set to READY or FAILED. Returns early, leaving it PREPARING, if
    `stopping` is set (a later start prepares it again from the beginning). `budget` is shared by
    every set being prepared (None: this set's own, of tuning.memory_bytes). An outage of the
    object store or the database (TRANSIENT) is raised, leaving the set PREPARING: the caller
    tries again (`fail` ends it if the outage lasts); nothing is wrong with the set."""
    budget = budget or MemoryBudget(tuning.memory_bytes)
    with session_scope(engine) as session:
        row = session.get(TrainingSetRow, set_id)
        if row is None or row.state != PREPARING:
            return
        spec, class_names = spec_of(row), list(row.class_names)
        fraction, seed = row.validation_fraction, row.split_seed
        pipeline = pipelines.get_pipeline(session, name=spec.pipeline, field="pipeline")
        tile_size = pipeline.tile_size
        defaults = hyperparameters.pipeline_defaults(hyperparameters.deserialized(pipeline.default_hyperparameters))
        # Tiles are measured under the percentiles jobs on the pipeline use unless they ask for others.
        percentiles = float(defaults["percentile_low"]), float(defaults["percentile_high"])  # type: ignore[arg-type]
    try:
        store.delete_prefix(object_keys.training_set_prefix(set_id))  # an interrupted preparation's
        checked = _check_and_store(engine, store, set_id, spec, class_names, tile_size, percentiles, stopping,
                                   tuning, budget)
        if checked is None:
            return
        tiles, warnings = checked
        validation = _split(tiles, fraction, seed)
        _finish(engine, set_id, tiles, validation, _report(tiles, validation, class_names, warnings))
    except _Failed as failed:
        _fail(engine, store, set_id, failed.reason, failed.issues)
    except TRANSIENT:
        raise
    except Exception:
        log.exception("preparing %s failed", names.training_set(set_id))
        _fail(engine, store, set_id, "the pipeline service could not prepare the set (an internal error, logged); "
              "create it again with the same request to retry", [])


TRANSIENT = (UnavailableError, OperationalError)


def fail(engine: Engine, store: ObjectStore, set_id: str, reason: str) -> None:
    """Ends a PREPARING set FAILED for `reason` (no tile is at fault), removing what it stored."""
    _fail(engine, store, set_id, reason, [])


def _check_and_store(engine: Engine, store: ObjectStore, set_id: str, spec: TrainingSetSpec, class_names: list[str],
                     tile_size: int, percentiles: tuple[float, float], stopping: threading.Event, tuning: Tuning,
                     budget: MemoryBudget) -> tuple[list[_Tile], list[pb.ValidationIssue]] | None:
    """Every tile checked and stored, with the warnings no one tile has (an annotation collection's);
    None if `stopping` was set. _Failed naming the unusable tiles (at most MAX_REPORTED are read)."""
    collection = _collection(store, spec, class_names)
    checked: list[_Tile] = []
    errors: list[pb.ValidationIssue] = []
    progress = _Progress(engine, set_id)
    one = _tile_checker(store, set_id, spec, class_names, tile_size, percentiles, collection, budget)
    with contextlib.closing(_bounded_map(one, range(len(spec.tiles)), tuning)) as results:
        for result in results:
            if stopping.is_set():
                return None
            if isinstance(result, list):
                errors += result
                if len(errors) >= MAX_REPORTED:
                    break  # enough to say what is wrong; the rest of the set is not worth reading
            else:
                checked.append(result)
            progress.advance()
    if errors:
        unusable = sorted({e.tile for e in errors})
        shown = "; ".join(e.message for e in errors[:5]) + ("; …" if len(errors) > 5 else "")
        raise _Failed(f"{len(unusable)}{'+' if len(errors) >= MAX_REPORTED else ''} tile(s) cannot be used: {shown}",
                      errors[:MAX_REPORTED])
    if collection is None:
        return checked, []
    return checked, [_issue(i) for i in collection.issues + collection.unmatched(t.name for t in checked)]


def _tile_checker(store: ObjectStore, set_id: str, spec: TrainingSetSpec, class_names: list[str], tile_size: int,
                  percentiles: tuple[float, float], collection: formats.AnnotationCollection | None,
                  budget: MemoryBudget) -> Callable[[int], _Tile | list[pb.ValidationIssue]]:
    raster = spec.format in formats.RASTER_FORMATS
    image_bytes_at_most = image_bytes_limit(tile_size)
    annotation_bytes = image_bytes_at_most if raster else limits.MAX_JSON_BYTES
    pixels_at_most = tile_size * tile_size

    def one(i: int) -> _Tile | list[pb.ValidationIssue]:
        # The most this tile can take, until its files' sizes and its header say what it does.
        most = (image_bytes_at_most + (annotation_bytes if spec.tiles[i].annotation_key else 0)
                + pixels_at_most * _BYTES_PER_PIXEL)
        with budget.reserved(most) as held:
            return checked(i, held)

    def needed(name: str, image_bytes: bytes, annotation: bytes | None) -> int:
        try:
            width, height = imaging.image_size(image_bytes, name)
        except InvalidTileError:
            width = height = 0  # unreadable: decoding says why, at once
        return len(image_bytes) + len(annotation or b"") + min(width * height, pixels_at_most) * _BYTES_PER_PIXEL

    def checked(i: int, held: _Held) -> _Tile | list[pb.ValidationIssue]:
        tile = spec.tiles[i]
        name = PurePosixPath(tile.image_key).stem

        def error(reason: str, code: str) -> list[pb.ValidationIssue]:
            return [pb.ValidationIssue(severity=ERROR, code=code, tile=name,
                                       message=f"tile {name!r} (tiles[{i}]): {reason}")]
        try:
            image_bytes = store.get(tile.image_key, max_bytes=image_bytes_at_most)
            annotation = (store.get(tile.annotation_key, max_bytes=annotation_bytes) if tile.annotation_key
                          else None)
        except NotFoundError as exc:
            return error(exc.message, "MISSING")
        except ObjectTooLargeError as exc:
            which = "annotation file" if exc.key == tile.annotation_key else "image"
            return error(f"the {which} {exc.message}", "TOO_LARGE")
        held.keep(needed(name, image_bytes, annotation))
        try:
            image = imaging.decode_image(image_bytes, name, max_side=tile_size)
            height, width = image.shape[:2]
            rendered = (collection.render(tile=name, width=width, height=height) if collection is not None
                        else formats.render_tile(spec.format, annotation, tile=name, width=width, height=height,
                                                 class_names=class_names, instance_class=spec.instance_class or 1))
        except TileTooLargeError as exc:
            return error(f"{exc.reason} (the pipeline's tiles are at most {tile_size}x{tile_size}: cut images into "
                         "tiles of that size, or use a pipeline with a larger tile size)", "TOO_LARGE")
        except InvalidTileError as exc:
            return error(exc.reason, "UNREADABLE")
        if rendered.has_errors:
            return [e for issue in rendered.issues if issue.severity == formats.ERROR
                    for e in error(issue.message, issue.code)]
        mask = rendered.mask
        mask_png = imaging.encode_mask_png(mask)
        digests = hashlib.sha256(image_bytes).hexdigest(), hashlib.sha256(mask_png).hexdigest()
        ext = PurePosixPath(tile.image_key).suffix.lower()
        image_uri = object_keys.training_set_image(set_id, name, digests[0], ext)
        mask_uri = object_keys.training_set_mask(set_id, name, digests[1])
        store.put(image_uri, image_bytes)
        store.put(mask_uri, mask_png, content_type="image/png")
        labelled = mask[mask != UNLABELLED]
        class_pixels = np.bincount(labelled.ravel().astype(np.int64), minlength=len(class_names))[:len(class_names)]
        return _Tile(
            name=name, source_image=tile.source_image or name, image_uri=image_uri, mask_uri=mask_uri,
            width=int(width), height=int(height), digests=digests, class_pixels=class_pixels,
            measures=_measures(image, class_pixels, percentiles, len(image_bytes) + len(mask_png)),
            profile=intensity.profile_image(image),
            warnings=[_issue(i) for i in rendered.issues])
    return one


def _measures(image: np.ndarray, class_pixels: np.ndarray, percentiles: tuple[float, float], stored_bytes: int
              ) -> bytes:
    """The tile's TileMeasures: what a trainer would otherwise find by reading it again."""
    height, width = image.shape[:2]
    return trainer_pb2.TileMeasures(
        class_pixels=class_pixels.tolist(), stored_bytes=stored_bytes,
        # The image as decoded, and the mask as trainers decode it (int64 class indices).
        decoded_bytes=image.nbytes + height * width * np.dtype(np.int64).itemsize,
        scalings=[trainer_pb2.ScalingMeasures(mode=mode, percentile_low=low, percentile_high=high,
                                              row=measured.row().tolist())
                  for (mode, low, high), measured in intensity.measure_scalings(image, *percentiles).items()],
    ).SerializeToString()


def _bounded_map(fn: Callable[[T], R], items: Sequence[T], tuning: Tuning) -> Generator[R, None, None]:
    """`fn` over `items` on `tuning.threads` threads, in order, with at most `tuning.window` results
    held at once; stopping the iteration cancels what has not started."""
    pool = ThreadPoolExecutor(max_workers=tuning.threads, thread_name_prefix="set-preparation")
    pending: deque[Future[R]] = deque()
    it = iter(items)
    try:
        for item in itertools.islice(it, tuning.window):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """Writes how many tiles are checked, at most every PROGRESS_INTERVAL_S."""

    def __init__(self, engine: Engine, set_id: str) -> None:
        self._engine, self._set_id, self.done, self._last = engine, set_id, 0, 0.0

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            with session_scope(self._engine) as session:
                session.execute(update(TrainingSetRow).where(
                    col(TrainingSetRow.id) == self._set_id, col(TrainingSetRow.state) == PREPARING,
                ).values(tiles_checked=self.done, update_time=utcnow()))


def _collection(store: ObjectStore, spec: TrainingSetSpec, class_names: list[str]
                ) -> formats.AnnotationCollection | None:
    if not spec.annotations_key:
        return None
    try:
        data = store.get(spec.annotations_key, max_bytes=limits.MAX_JSON_BYTES)
        collection = formats.load_collection(spec.format, data, class_names)
    except (NotFoundError, ObjectTooLargeError) as exc:
        raise _Failed(f"annotations_key: {exc.message}") from None
    except InvalidParameterError as exc:
        raise _Failed(f"annotations_key: {exc.reason}") from None
    errors = [_issue(i) for i in collection.issues if i.severity == formats.ERROR][:MAX_REPORTED]
    if errors:
        raise _Failed(f"annotations_key: {'; '.join(e.message for e in errors[:5])}", errors)
    return collection


def _issue(issue: formats.AnnotationIssue) -> pb.ValidationIssue:
    return pb.ValidationIssue(severity=SEVERITIES[issue.severity], code=issue.code, tile=issue.tile,
                              message=issue.message)


def _split(tiles: list[_Tile], fraction: float, seed: int) -> set[str]:
    try:
        result = splits.split_train_val(
            [t.name for t in tiles], seed=seed, val_fraction=fraction, groups=[t.source_image for t in tiles],
            labels_present=[{int(c) for c in np.nonzero(t.class_pixels)[0]} for t in tiles],
        )
    except InvalidParameterError as exc:
        raise _Failed(f"tiles: {exc.reason}") from None
    return set(result.val)


def _report(tiles: list[_Tile], validation: set[str], class_names: list[str],
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
    issues = [w for t in tiles for w in t.warnings] + list(warnings)
    for stats in classes[1:]:
        if stats.pixel_count == 0:
            issues.append(pb.ValidationIssue(severity=pb.ValidationIssue.SEVERITY_WARNING, code="CLASS_ABSENT",
                                             message=f"class {stats.class_name!r} has no annotated pixel"))
        elif stats.validation_tile_count == 0:
            issues.append(pb.ValidationIssue(
                severity=pb.ValidationIssue.SEVERITY_WARNING, code="CLASS_NOT_IN_VALIDATION",
                message=f"class {stats.class_name!r} does not appear in the validation split"))
    if len(issues) > MAX_WARNINGS:
        more = len(issues) - MAX_WARNINGS + 1
        issues = [*issues[:MAX_WARNINGS - 1], pb.ValidationIssue(
            severity=pb.ValidationIssue.SEVERITY_WARNING, code="MORE_WARNINGS", message=f"{more} more warnings")]
    profile = intensity.profile_images([])
    for t in tiles:
        profile = profile.merged(t.profile)
    return pb.ValidationReport(classes=classes, issues=issues, image_profile=pb.ImageProfile(
        pixel_types=profile.pixel_types, single_channel=profile.single_channel, min_value=profile.min_value,
        max_value=profile.max_value, recorded=True))


def _snapshot_hash(tiles: list[_Tile], class_names: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(class_names).encode())
    for t in sorted(tiles, key=lambda t: t.name):
        digest.update(json.dumps([t.name, t.source_image, *t.digests]).encode())
    return f"sha256:{digest.hexdigest()}"


def _finish(engine: Engine, set_id: str, tiles: list[_Tile], validation: set[str], report: pb.ValidationReport) -> None:
    """Tile rows, split, report and READY in one transaction (only if the set is still PREPARING)."""
    with session_scope(engine, serialized=True) as session:
        row = session.get(TrainingSetRow, set_id, with_for_update=True)
        if row is None or row.state != PREPARING:
            return
        session.execute(insert(TileRow), [
            {"training_set": set_id, "name": t.name, "image_uri": t.image_uri, "mask_uri": t.mask_uri,
             "source_image": t.source_image, "width": t.width, "height": t.height, "validation": t.name in validation,
             "measures": t.measures}
            for t in tiles])
        row.state, row.snapshot, row.tiles_checked = READY, _snapshot_hash(tiles, list(row.class_names)), len(tiles)
        row.tile_count, row.validation_tile_count = len(tiles), len(validation)
        row.train_tile_count = len(tiles) - len(validation)
        row.report, row.update_time = report.SerializeToString(), utcnow()
    log.info("%s READY: %d tiles", names.training_set(set_id), len(tiles))


def _fail(engine: Engine, store: ObjectStore, set_id: str, reason: str, issues: list[pb.ValidationIssue]) -> None:
    store.delete_prefix(object_keys.training_set_prefix(set_id))
    with session_scope(engine, serialized=True) as session:
        row = session.get(TrainingSetRow, set_id, with_for_update=True)
        if row is None or row.state != PREPARING:
            return
        row.state, row.failure_reason, row.update_time = FAILED, reason, utcnow()
        row.report = pb.ValidationReport(issues=issues).SerializeToString()
    log.info("%s FAILED: %s", names.training_set(set_id), reason)

