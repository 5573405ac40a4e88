"""Tiles streamed into training: the set is never held decoded in memory.

A training run reads its tiles through a ``TileSource``: anything with ``len()`` and
``source[i] -> Sample`` (a plain list of samples is one; a trainer node's source reads each tile
from object storage when asked). Two passes use it:
* ``scan`` once before training: every tile is checked (shape, values, mask classes), the
  class pixel counts and the normalization statistics are accumulated, one tile at a time
  (unless the set's preparation measured the tiles already: ``KnownMeasures``, no tile read);
* ``BatchStream`` every epoch: a torch ``DataLoader`` (worker processes when asked) prepares the
  tiles of each planned batch (decode, check, measure the normalization over the whole tile) and
  cuts each training tile's random crop there, so only the crop travels to the training process,
  still in its native pixel type. The crop's position comes from a seed in the request
  (``TileRequest``), so it is the same whichever process cuts it; the conversion of the crop to
  float32 and augmentation happen in the training process, drawn from its generators. Results do
  not depend on how many workers load the data.

Loader processes are forked from a fork server (``start_loader_server``, started before the
checking pass so its imports overlap it) that has imported the data modules once: each loader
starts in milliseconds instead of importing torch again, and shares those pages with the others.

Memory: a batch or two per worker in flight, whatever the size of the set.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segcore.data import PreparedSample, Sample, check_sample, prepare_sample, random_crop
from segcore.errors import InvalidParameterError
from segcore.imaging import Normalization
from segcore.intensity import (
    ImageMeasures,
    ImageProfile,
    ScalingKey,
    measure,
    normalization_of,
    profile_image,
    profile_images,
    scaling_key,
)


class TileSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


@dataclass
class ScanResult:
    """What one pass over a split found."""

    normalization: Normalization | None
    class_pixels: torch.Tensor  # labelled pixels per class index (int64)
    profile: ImageProfile | None  # None when no tile was read (KnownMeasures)
    prepared_bytes: int  # what the prepared tiles of the split hold (native image and mask)
    # Each tile's normalization measures (segcore.intensity.ImageMeasures.row), N x 13, when the
    # scan was asked to measure: loaders then neither check nor measure a tile again.
    measures: np.ndarray | None = None


@dataclass(frozen=True)
class KnownMeasures:
    """What preparing a training set found of each tile of one split, in the split's order (the
    pipeline service checked every tile then): with them ``scan`` reads no tile."""

    class_pixels: np.ndarray  # N x classes, int64
    decoded_bytes: int  # of every tile's image and mask, decoded
    rows: Mapping[ScalingKey, np.ndarray]  # each scaling measured: N x 13 (ImageMeasures.row)

    def scan(self, mode: str, low: float, high: float, compute_normalization: bool) -> ScanResult | None:
        """The ScanResult a pass under `mode` would give; None if this scaling was not measured."""
        rows = self.rows.get(scaling_key(mode, low, high))
        if rows is None:
            return None
        norm = None
        if compute_normalization:
            norm = normalization_of((ImageMeasures.from_row(r) for r in rows), mode, percentile_low=low,
                                    percentile_high=high)
        return ScanResult(normalization=norm, class_pixels=torch.from_numpy(self.class_pixels.sum(axis=0)),
                          profile=None, prepared_bytes=self.decoded_bytes, measures=rows)


def scan(source: TileSource, *, num_classes: int, ignore_index: int, field: str, mode: str | None = None,
         percentile_low: float = 1.0, percentile_high: float = 99.8, threads: int = 0,
         compute_normalization: bool = True, known: KnownMeasures | None = None) -> ScanResult:
    """Checks every tile of `source` and accumulates its statistics in one pass; with a `mode`,
    each tile's normalization measures under it too (and the set's normalization, unless
    `compute_normalization` is false). Raises InvalidTileError naming the first bad tile. With
    `known` measures of this mode's scaling, no tile is read: they are the result."""
    if len(source) == 0:
        raise InvalidParameterError(field, "need at least one sample")
    if known is not None and mode is not None:
        found = known.scan(mode, percentile_low, percentile_high, compute_normalization)
        if found is not None:
            return found
    counts = np.zeros(num_classes, dtype=np.int64)
    profile = profile_images([])
    prepared_bytes = 0

    rows: list[np.ndarray] = []

    def checked() -> Iterator[ImageMeasures]:
        nonlocal counts, profile, prepared_bytes
        for sample in _raw_stream(source, threads):
            check_sample(sample, num_classes, ignore_index)
            prepared_bytes += np.asarray(sample.image).nbytes + np.asarray(sample.mask).nbytes
            labelled = sample.mask[sample.mask != ignore_index].astype(np.int64).ravel()
            counts += np.bincount(labelled, minlength=num_classes)[:num_classes]
            profile = profile.merged(profile_image(sample.image))
            if mode is not None:
                measured = measure(np.asarray(sample.image), mode, percentile_low, percentile_high)
                rows.append(measured.row())
                yield measured

    stream = checked()
    norm = None
    if mode is not None and compute_normalization:
        norm = normalization_of(stream, mode, percentile_low=percentile_low, percentile_high=percentile_high)
    for _ in stream:  # every tile is checked, whatever is computed
        pass
    return ScanResult(normalization=norm, class_pixels=torch.from_numpy(counts), profile=profile,
                      prepared_bytes=prepared_bytes, measures=np.stack(rows) if rows else None)


@dataclass(frozen=True)
class TileRequest:
    """A tile of a planned batch: the whole tile (`crop_size` 0), or its random crop of
    `crop_size` drawn from `crop_seed` (segcore.data.random_crop)."""

    index: int
    crop_size: int = 0
    crop_seed: int = 0

    def cut(self, prepared: PreparedSample) -> PreparedSample:
        return random_crop(prepared, self.crop_size, self.crop_seed) if self.crop_size else prepared


class PreparedTiles(Dataset[PreparedSample]):
    """`source`'s tiles, each prepared (and cropped, when asked) on request, in a loader worker
    when there are workers. With the checking pass's `measures` (one row per tile, under `norm`'s
    mode) a tile is decoded and cut, not checked or measured again."""

    def __init__(self, source: TileSource, norm: Normalization, num_classes: int, ignore_index: int,
                 measures: np.ndarray | None = None) -> None:
        self.source, self.norm, self.num_classes, self.ignore_index = source, norm, num_classes, ignore_index
        self.measures = measures

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, request: TileRequest) -> PreparedSample:  # type: ignore[override]
        measured = None if self.measures is None else ImageMeasures.from_row(self.measures[request.index])
        return request.cut(prepare_sample(self.source[request.index], self.norm, self.num_classes,
                                          self.ignore_index, measured))


class _Plan(Sampler[list[TileRequest]]):
    """The batches of the current epoch; the stream sets them before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[TileRequest]] = []

    def __iter__(self) -> Iterator[list[TileRequest]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def prepared_cache_budget(prepared_bytes: int, budget_bytes: int) -> int:
    """All or nothing: a set whose prepared tiles fit `budget_bytes` is kept whole; a larger one
    keeps none. (Epochs visit every tile in a new order, so a cache holding part of the set
    would almost never hold the next tile: it would cost its memory for nothing.)"""
    return budget_bytes if prepared_bytes <= budget_bytes else 0


class _PreparedCache:
    """Prepared tiles kept between epochs, least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[int, PreparedSample] = OrderedDict()

    def get(self, index: int) -> PreparedSample | None:
        item = self._items.get(index)
        if item is not None:
            self._items.move_to_end(index)
        return item

    def __contains__(self, index: int) -> bool:
        return index in self._items

    def put(self, index: int, item: PreparedSample) -> None:
        size = item.nbytes
        if size > self.max_bytes or index in self._items:
            return
        self._items[index] = item
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes




class BatchStream:
    """Prepared tiles of planned batches, in plan order. With `workers` > 0 the tiles are prepared
    by that many worker processes (forked from the fork server, kept for the whole run), a few
    batches ahead; up to
    `cache_bytes` of prepared tiles are kept between epochs and not prepared again."""

    def __init__(self, dataset: PreparedTiles, *, workers: int, pin_memory: bool = False,
                 cache_bytes: int = 0) -> None:
        self._cache = _PreparedCache(cache_bytes)
        self._plan = _Plan()
        self._loader: DataLoader[PreparedSample] = DataLoader(
            dataset, batch_sampler=self._plan, collate_fn=_as_list, num_workers=workers,
            multiprocessing_context=_loader_context(dataset.source) if workers else None,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers else None, pin_memory=pin_memory)

    def __len__(self) -> int:
        return len(self._loader.dataset)  # type: ignore[arg-type]

    def batches(self, plan: list[list[TileRequest]]) -> Iterator[list[PreparedSample]]:
        """The prepared tiles of each planned batch. The loader is asked only for the tiles the
        cache does not hold, in plan order: whole while the cache keeps them (the cut is made
        here), cut by the loader otherwise."""
        caching = self._cache.max_bytes > 0
        missing = [[r if not caching else TileRequest(r.index) for r in batch if r.index not in self._cache]
                   for batch in plan]
        self._plan.batches = [m for m in missing if m]
        loaded = iter(self._loader) if self._plan.batches else iter(())
        for batch, wanted in zip(plan, missing, strict=True):
            if not caching:  # nothing is cached: the loader answers the batch as asked
                yield next(loaded) if wanted else []
                continue
            fresh: dict[int, PreparedSample] = dict(zip((r.index for r in wanted), next(loaded), strict=True)) \
                if wanted else {}
            for index, item in fresh.items():
                self._cache.put(index, item)
            yield [r.cut(fresh[r.index] if r.index in fresh else self._cache.get(r.index)) for r in batch]  # type: ignore[arg-type]

    def close(self) -> None:
        """Stops the worker processes now, rather than whenever the stream is collected."""
        iterator = getattr(self._loader, "_iterator", None)  # kept by the loader for persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


def _as_list(items: list[PreparedSample]) -> list[PreparedSample]:
    return items


def start_loader_server(source: TileSource) -> None:
    """Starts the fork server loader processes come from (if not yet running), importing the
    modules that `source`'s tiles need, so the first epoch does not wait for them."""
    _loader_context(source)
    multiprocessing.forkserver.ensure_running()


def _loader_context(source: object) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, *_modules_of(source)])
    return context


def _modules_of(source: object) -> list[str]:
    """The modules whose classes a pickled `source` refers to (a joined source's parts')."""
    parts = [source.first, source.second] if isinstance(source, Joined) else [source]
    return sorted({type(p).__module__ for p in parts} - {"builtins"})


class Joined:
    """Two sources as one (the second's tiles after the first's): the training and validation
    splits share one loader and its worker processes."""

    def __init__(self, first: TileSource, second: TileSource) -> None:
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index: int) -> Sample:
        return self.first[index] if index < len(self.first) else self.second[index - len(self.first)]


def _raw_stream(source: TileSource, threads: int) -> Iterator[Sample]:
    """Every tile in order, read `threads` at a time (reading and decoding wait on storage and
    release the GIL; threads cost no start-up, unlike loader processes, for this one pass)."""
    if threads == 0:
        yield from (source[i] for i in range(len(source)))
        return
    window = 4 * threads  # reads in flight: memory stays a few tiles whatever the set's size
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-scan") as pool:
        pending = deque(pool.submit(source.__getitem__, i) for i in range(min(window, len(source))))
        for i in range(len(source)):
            if i + window < len(source):
                pending.append(pool.submit(source.__getitem__, i + window))
            yield pending.popleft().result()
