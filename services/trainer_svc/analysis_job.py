"""One analysis job's attempt in its worker process: a registered model predicts a class-index
mask for every tile of the job's inputs, measures it (segcore.measure) and stores mask and
results under the attempt's prefix, reporting progress as events on the job's log.

Work streams, so memory does not grow with the number of tiles: I/O threads fetch and decode up
to AHEAD tiles ahead of the forwards (one batch of BATCH on the main thread, whose torch thread
pool stays warm) and encode and store masks behind them (at most BEHIND in flight). Per-tile
records go, in input order, to pages of PAGE tiles in the object store (what ListAnalysisTiles
reads) and to tiles.csv, tiles.json and the manifest, written to local files as they come and
uploaded at the end. A tile that cannot be read or decoded is recorded with its error and the
analysis goes on; it fails only if no tile could be analysed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import imaging, inference, limits, measure
from segcore.errors import InvalidTileError
from segcore.imaging import Normalization
from services.common import object_keys
from services.common.errors import NotFoundError
from services.common.storage import ObjectStore, ObjectTooLargeError
from services.common.timeutil import to_duration
from services.trainer_svc.analysis import load_analysis_model
from services.trainer_svc.executor import failure_of
from services.trainer_svc.runs import JobRun
from services.trainer_svc.tile_source import PatientStore

log = logging.getLogger(__name__)
S = common_pb2
BATCH = 8  # tiles per forward (those that fit one window and share a shape)
AHEAD = 4 * BATCH  # tiles fetched and decoded ahead of the forwards
BEHIND = 4 * BATCH  # masks being encoded and stored behind them
PAGE = 1000  # per-tile records per results page
IO_THREADS = 8
CSV_COLUMNS = ("tile", "image", "mask", "width", "height", "class_index", "class_name", "pixel_count",
               "area_fraction", "object_count", "error")


@dataclass(frozen=True)
class TileInput:
    index: int
    tile: str
    image: str


def read_inputs(data: bytes) -> list[TileInput]:
    """The inputs object's lines (written by the pipeline service at creation)."""
    found = []
    for index, line in enumerate(data.decode().splitlines()):
        entry = json.loads(line)
        found.append(TileInput(index, str(entry["tile"]), str(entry["image"])))
    return found


@dataclass
class _ClassTotal:
    pixels: int = 0
    objects: int = 0
    tiles: int = 0


@dataclass
class _Totals:
    classes: list[_ClassTotal]
    pixels: int = 0
    analysed: int = 0
    failed: int = 0
    first_errors: list[str] = field(default_factory=list)


class Results:
    """The per-tile records, taken in input order: pages go to the object store as they fill,
    the CSV, JSON and manifest to local files (uploaded by `finish`)."""

    def __init__(self, store: PatientStore, prefix: str, *, header: dict[str, Any], class_names: list[str],
                 folder: Path) -> None:
        self._store, self._prefix, self._class_names = store, prefix, class_names
        self._folder = folder
        self._page: list[dict[str, Any]] = []
        self.pages: list[common_pb2.Artifact] = []
        self.totals = _Totals([_ClassTotal() for _ in class_names])
        self._csv_file = self._open("tiles.csv")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(CSV_COLUMNS)
        self._json = self._open("tiles.json")
        self._json.write("[")
        self._manifest = self._open("manifest.json")
        self._manifest.write(json.dumps(header)[:-1] + ', "tiles": [')
        self._count = 0

    def _open(self, name: str) -> TextIO:
        return (self._folder / name).open("w", newline="", encoding="utf-8")

    @property
    def done(self) -> int:
        return self._count

    def add(self, record: dict[str, Any]) -> None:
        separator = "," if self._count else ""
        self._count += 1
        self._page.append(record)
        self._json.write(separator + "\n" + json.dumps(record))
        self._manifest.write(separator + "\n" + json.dumps(
            {"tile": record["tile"], "image": record["image"], "mask": record["mask"], "error": record["error"]}))
        base = [record["tile"], record["image"], record["mask"], record["width"], record["height"]]
        totals = self.totals
        if record["error"]:
            totals.failed += 1
            if len(totals.first_errors) < 5:
                totals.first_errors.append(f"{record['tile']!r}: {record['error']}")
            self._csv.writerow([*base, "", "", "", "", "", record["error"]])
        else:
            totals.analysed += 1
            totals.pixels += record["width"] * record["height"]
            for c, total in zip(record["classes"], totals.classes, strict=True):
                total.pixels += c["pixels"]
                total.objects += c["objects"]
                total.tiles += c["pixels"] > 0
                self._csv.writerow([*base, c["index"], c["name"], c["pixels"], f"{c['fraction']:.6f}", c["objects"],
                                    ""])
        if len(self._page) == PAGE:
            self._flush_page()

    def _flush_page(self) -> None:
        key = object_keys.analysis_result(self._prefix, f"tiles-{len(self.pages):05d}.json")
        self.pages.append(self._put_bytes(key, json.dumps(self._page).encode()))
        self._page = []

    def class_totals(self) -> list[common_pb2.ClassTotal]:
        pixels = max(1, self.totals.pixels)
        return [S.ClassTotal(class_index=i, class_name=name, pixel_count=t.pixels, area_fraction=t.pixels / pixels,
                             object_count=t.objects, tiles_present=t.tiles)
                for i, (name, t) in enumerate(zip(self._class_names, self.totals.classes, strict=True))]

    def finish(self) -> common_pb2.AnalysisOutput:
        """Uploads what is left: the last page, the files, the per-class totals, the manifest."""
        if self._page:
            self._flush_page()
        self._json.write("\n]\n")
        classes = self.class_totals()
        summary = [{"class_index": c.class_index, "class_name": c.class_name, "pixel_count": c.pixel_count,
                    "area_fraction": c.area_fraction, "object_count": c.object_count,
                    "tiles_present": c.tiles_present} for c in classes]
        self._manifest.write("\n], " + json.dumps({
            "tiles_analysed": self.totals.analysed, "tiles_failed": self.totals.failed, "classes": summary,
            "pages": [p.uri for p in self.pages]})[1:] + "\n")
        for handle in (self._csv_file, self._json, self._manifest):
            handle.close()
        classes_csv = io.StringIO()
        writer = csv.DictWriter(classes_csv, fieldnames=list(summary[0]) if summary else ["class_index"])
        writer.writeheader()
        writer.writerows(summary)
        output = S.AnalysisOutput(
            tiles_analysed=self.totals.analysed, tiles_failed=self.totals.failed, classes=classes,
            tiles_csv=self._put_file("tiles.csv", "text/csv"), tiles_json=self._put_file("tiles.json"),
            classes_csv=self._put_bytes(self._key("classes.csv"), classes_csv.getvalue().encode(), "text/csv"),
            classes_json=self._put_bytes(self._key("classes.json"), json.dumps(summary, indent=1).encode()),
            tile_pages=self.pages)
        output.manifest.CopyFrom(self._put_file("manifest.json"))  # last: it names everything above
        return output

    def close(self) -> None:
        for handle in (self._csv_file, self._json, self._manifest):
            handle.close()

    def _key(self, name: str) -> str:
        return object_keys.analysis_result(self._prefix, name)

    def _put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> common_pb2.Artifact:
        self._store.put(key, data, content_type=content_type)
        return S.Artifact(uri=key, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _put_file(self, name: str, content_type: str = "application/json") -> common_pb2.Artifact:
        path = self._folder / name
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        key = self._key(name)
        self._store.put_file(key, path, content_type=content_type)
        return S.Artifact(uri=key, size_bytes=path.stat().st_size, sha256=digest.hexdigest())


class _Progress:
    def __init__(self, run: JobRun, total: int, interval_s: float) -> None:
        self._run, self._total, self._interval = run, total, interval_s
        self._started = self._last = time.monotonic()

    def report(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        elapsed = now - self._started
        progress = S.Progress(percent=round(100 * done / max(1, self._total), 2), tiles_done=done,
                              tiles=self._total, elapsed=to_duration(elapsed), phase=S.PHASE_ANALYSING)
        if done:
            progress.eta.CopyFrom(to_duration(elapsed / done * (self._total - done)))
        self._run.emit(S.JobEvent(progress=progress, tiles_progress=S.TilesProgress(
            tiles_done=done, tiles_failed=failed, tiles=self._total)))


class AnalysisExecutor:
    def __init__(self, store: ObjectStore, *, device: str | None, num_threads: int | None,
                 progress_interval_s: float, storage_patience_s: float) -> None:
        self._store = PatientStore(store, patience_s=storage_patience_s)
        self._device = device
        self._num_threads = num_threads
        self._progress_interval_s = progress_interval_s

    def execute(self, run: JobRun, request: trainer_pb2.RunJobRequest) -> None:
        """Runs the attempt to its end; always finishes the run's log with a `finished` event."""
        folder = Path(tempfile.mkdtemp(prefix="segtrain-analysis-"))
        try:
            finished = self._analyse(run, request, folder)
        except Exception as exc:  # every failure ends the attempt; failure_of says what to change
            finished = failure_of(request.job, exc)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        run.emit(S.JobEvent(finished=finished))

    def _analyse(self, run: JobRun, request: trainer_pb2.RunJobRequest, folder: Path) -> common_pb2.JobFinished:
        task = request.analysis
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        run.emit(S.JobEvent(phase_change=S.PhaseChange(phase=S.PHASE_PREPARING_DATA),
                            progress=S.Progress(phase=S.PHASE_PREPARING_DATA, tiles=task.tile_count)))
        model, meta = load_analysis_model(self._store.get_model(task.model), self._device)
        inputs = read_inputs(self._store.get(task.inputs_uri))
        class_names = list(meta.class_names)
        header = {"analysis": request.job, "attempt": request.attempt, "model": task.model.name,
                  "model_weights_sha256": task.model.weights_sha256, "class_names": class_names,
                  "tile_count": len(inputs), "normalization": Normalization.from_dict(meta.normalization).describe(),
                  "masks": "class-index PNG, one per tile; pixel value = class index",
                  "objects": "8-connected components of each class"}
        results = Results(self._store, request.output_prefix, header=header, class_names=class_names, folder=folder)
        progress = _Progress(run, len(inputs), self._progress_interval_s)
        run.emit(S.JobEvent(phase_change=S.PhaseChange(phase=S.PHASE_ANALYSING),
                            progress=S.Progress(phase=S.PHASE_ANALYSING, tiles=len(inputs))))
        try:
            stopped = self._stream(run, model, meta, inputs, request.output_prefix, results, progress)
            if stopped:
                results.close()
                if run.handing_back:
                    return S.JobFinished(state=S.JOB_STATE_QUEUED, reason=(
                        "the trainer node shut down (or lost its worker) and handed the analysis back; it starts "
                        "over on another node"))
                return S.JobFinished(state=S.JOB_STATE_CANCELLED, reason="cancelled by request")
            progress.report(results.done, results.totals.failed, force=True)
            totals = results.totals
            if not totals.analysed:
                results.close()
                return S.JobFinished(state=S.JOB_STATE_FAILED, reason=(
                    f"none of the {len(inputs)} tiles could be analysed: {'; '.join(totals.first_errors)}"))
            run.emit(S.JobEvent(phase_change=S.PhaseChange(phase=S.PHASE_FINALISING)))
            output = results.finish()
        except BaseException:
            results.close()
            raise
        if totals.failed:
            run.emit(S.JobEvent(warning=S.Warning(code="TILES_FAILED", message=(
                f"{totals.failed} of {len(inputs)} tiles could not be analysed (see tiles.csv), e.g. "
                f"{'; '.join(totals.first_errors)}"))))
        return S.JobFinished(state=S.JOB_STATE_SUCCEEDED, analysis=output,
                             environment={"device": str(next(model.parameters()).device),
                                          "threads": str(torch.get_num_threads())})

    def _stream(self, run: JobRun, model: torch.nn.Module, meta: Any, inputs: list[TileInput], prefix: str,
                results: Results, progress: _Progress) -> bool:
        """Analyses every input in order; True if stopped by a cancel or hand back."""
        norm = Normalization.from_dict(meta.normalization)
        num_classes = len(meta.class_names)
        # Where the main thread's time goes (logged at the end): I/O that keeps up costs it nothing.
        spent = {"waiting for tiles": 0.0, "forwards": 0.0, "waiting for stores": 0.0}
        with ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="analysis-io") as pool:
            reads = _Window(pool, self._read, iter(inputs), AHEAD)
            stored: deque[Future[dict[str, Any]]] = deque()
            try:
                while True:
                    started = time.perf_counter()
                    batch = reads.take(BATCH)
                    spent["waiting for tiles"] += time.perf_counter() - started
                    if not batch:
                        break
                    if run.cancel_requested:
                        return True
                    images = [(tile, image) for tile, image in batch if isinstance(image, np.ndarray)]
                    started = time.perf_counter()
                    masks = inference.predict_masks(model, [image for _, image in images], norm, batch_size=BATCH,
                                                    tile_size=meta.tile_size or None, device=self._device)
                    spent["forwards"] += time.perf_counter() - started
                    predicted = {tile.index: mask for (tile, _), mask in zip(images, masks, strict=True)}
                    for tile, image in batch:
                        if tile.index in predicted:
                            stored.append(pool.submit(self._store_mask, tile, predicted[tile.index], prefix,
                                                      meta.class_names, num_classes))
                        else:
                            stored.append(_done(_record(tile, error=str(image))))
                    started = time.perf_counter()
                    while stored and (len(stored) > BEHIND or stored[0].done()):
                        results.add(stored.popleft().result())
                    spent["waiting for stores"] += time.perf_counter() - started
                    progress.report(results.done, results.totals.failed)
                while stored:
                    results.add(stored.popleft().result())
                log.info("%s: %s", run.job, ", ".join(f"{what} {seconds:.1f} s" for what, seconds in spent.items()))
            finally:
                reads.cancel()
                for pending in stored:
                    pending.cancel()
        return False

    def _read(self, tile: TileInput) -> np.ndarray | str:
        """The tile's pixels, or why it cannot be analysed."""
        try:
            return imaging.decode_image(self._store.get(tile.image, max_bytes=limits.MAX_IMAGE_BYTES), tile.tile)
        except NotFoundError:
            return "image not found"
        except ObjectTooLargeError as exc:
            return f"the image {exc.message}"
        except InvalidTileError as exc:
            return exc.reason

    def _store_mask(self, tile: TileInput, mask: np.ndarray, prefix: str, class_names: list[str],
                    num_classes: int) -> dict[str, Any]:
        key = object_keys.analysis_tile_mask(prefix, tile.tile)
        self._store.put(key, imaging.encode_mask_png(mask), content_type="image/png")
        measures = measure.measure_mask(mask, num_classes)
        return _record(tile, mask=key, width=int(mask.shape[1]), height=int(mask.shape[0]), classes=[
            {"index": i, "name": name, "pixels": m.pixels, "fraction": m.fraction, "objects": m.objects}
            for i, (name, m) in enumerate(zip(class_names, measures, strict=True))])


def _record(tile: TileInput, *, mask: str = "", width: int = 0, height: int = 0,
            classes: list[dict[str, Any]] | None = None, error: str = "") -> dict[str, Any]:
    return {"tile": tile.tile, "image": tile.image, "mask": mask, "width": width, "height": height,
            "classes": classes or [], "error": error}


def _done(value: dict[str, Any]) -> Future[dict[str, Any]]:
    future: Future[dict[str, Any]] = Future()
    future.set_result(value)
    return future


class _Window:
    """`read` applied to `items` on `pool`, at most `ahead` in flight, taken in order."""

    def __init__(self, pool: ThreadPoolExecutor, read: Callable[[TileInput], Any], items: Iterator[TileInput],
                 ahead: int) -> None:
        self._pool, self._read, self._items, self._ahead = pool, read, items, ahead
        self._pending: deque[tuple[TileInput, Future[Any]]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            item = next(self._items, None)
            if item is None:
                return
            self._pending.append((item, self._pool.submit(self._read, item)))

    def take(self, most: int) -> list[tuple[TileInput, Any]]:
        taken: list[tuple[TileInput, Any]] = []
        while self._pending and len(taken) < most:
            item, future = self._pending.popleft()
            taken.append((item, future.result()))
        self._fill()
        return taken

    def cancel(self) -> None:
        for _, future in self._pending:
            future.cancel()
