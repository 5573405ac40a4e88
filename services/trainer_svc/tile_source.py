"""A training set's tiles as the training core reads them (segcore.tiles.TileSource): each tile is
fetched and decoded when asked, in whichever process asks (the worker, or its data-loader
processes), never all at once.

Fetched objects go through a bounded cache on the node's disk, in their stored (encoded, native
pixel type) form, shared by the processes of all attempts on the node: a second epoch reads the
disk, not the object store, and the cache never holds more than its budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from segtrain.trainer.v1 import trainer_pb2

from segcore import imaging
from segcore.data import Sample
from segcore.tiles import KnownMeasures
from services.common.errors import UnavailableError
from services.common.storage import ObjectStore, verified

log = logging.getLogger(__name__)
T = TypeVar("T")
_EVICT_EVERY = 64  # inserts between two checks of the cache's size


class PatientStore:
    """The object store as an attempt uses it: every call waits out an outage for up to
    `patience_s` (a short outage delays the job instead of failing it; these reads and writes are
    idempotent), tiles go through the node's disk cache, and a registered model's bytes are
    checked against their recorded sha256. Picklable: a data-loader process that unpickles it
    opens its own connections."""

    def __init__(self, store: ObjectStore, *, patience_s: float, cache: DiskCache | None = None) -> None:
        self._settings, self._patience_s, self._cache = store.settings, patience_s, cache
        self._store: ObjectStore | None = store

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_store": None}

    @property
    def _objects(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self._settings)
        return self._store

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self._retrying(lambda: self._objects.get(key, max_bytes=max_bytes))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._retrying(lambda: self._objects.put(key, data, content_type=content_type))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """A local file, streamed (never read whole into memory)."""
        def upload() -> None:
            with path.open("rb") as handle:
                self._objects.put_stream(key, handle, path.stat().st_size, content_type)
        self._retrying(upload)

    def get_tile_object(self, key: str) -> bytes:
        """A tile's image or mask, from the disk cache when it holds it."""
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None:
            return cached
        data = self.get(key)
        if self._cache is not None:
            self._cache.put(key, data)
        return data

    def warm(self, tiles: Sequence[trainer_pb2.TrainingTile], *, threads: int,
             stop: Callable[[], bool] = lambda: False) -> int:
        """Fetches into the disk cache the objects of `tiles` it does not hold, `threads` at a time,
        without decoding them, until `stop` says otherwise (asked every few dozen objects); returns
        how many it fetched (0 without a cache). The first failure is raised."""
        cache = self._cache
        if cache is None:
            return 0
        keys = [k for t in tiles for k in (t.image_uri, t.mask_uri) if not cache.holds(k)]

        def fetch(key: str) -> None:
            cache.put(key, self.get(key))
        fetched = 0
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-warm") as pool:
            for start in range(0, len(keys), 8 * threads):
                if stop():
                    break
                chunk = keys[start:start + 8 * threads]
                list(pool.map(fetch, chunk))
                fetched += len(chunk)
        return fetched

    def get_model(self, ref: trainer_pb2.ModelRef) -> bytes:
        """A registered model's weights, checked against the sha256 recorded at registration."""
        return verified(self.get(ref.weights_uri), key=ref.weights_uri, sha256=ref.weights_sha256)

    def _retrying(self, operation: Callable[[], T]) -> T:
        deadline, delay = time.monotonic() + self._patience_s, 0.2
        while True:
            try:
                return operation()
            except UnavailableError:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("object store unavailable; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


class DiskCache:
    """Objects by key in a folder, least recently used evicted past `max_bytes`. Safe across
    processes: files appear whole (written aside, then renamed) and a file evicted under a reader
    is simply fetched again."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self._inserts = 0

    def _path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def holds(self, key: str) -> bool:
        """Whether the cache has `key` (marked recently used if so)."""
        try:
            os.utime(self._path(key))
            return True
        except OSError:
            return False

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
            return data
        except OSError:
            return None

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, self._path(key))
        self._inserts += 1
        if self._inserts % _EVICT_EVERY == 1:
            self.evict()

    def evict(self) -> None:
        entries = []
        for entry in os.scandir(self.folder):
            if not entry.name.startswith("."):
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                return
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass


class StoredTiles:
    """The tiles of one split of a RunJobRequest, read and decoded one at a time."""

    def __init__(self, tiles: list[trainer_pb2.TrainingTile], store: PatientStore) -> None:
        # Plain tuples: cheap to pickle into every data-loader process.
        self._tiles = [(t.name, t.image_uri, t.mask_uri) for t in tiles]
        self._store = store

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, index: int) -> Sample:
        name, image_key, mask_key = self._tiles[index]
        return Sample(tile_id=name, image=imaging.decode_image(self._store.get_tile_object(image_key), name),
                      mask=imaging.decode_mask(self._store.get_tile_object(mask_key), name))


def known_measures(tiles: list[trainer_pb2.TrainingTile], num_classes: int) -> KnownMeasures | None:
    """What preparing the set measured of these tiles (in their order), or None when a tile was
    not measured (a set prepared before measures were recorded): training then reads every tile
    once before it starts."""
    if not tiles or not all(t.HasField("measures") for t in tiles):
        return None
    keys = [(s.mode, s.percentile_low, s.percentile_high) for s in tiles[0].measures.scalings]
    if any([(s.mode, s.percentile_low, s.percentile_high) for s in t.measures.scalings] != keys for t in tiles):
        return None  # measured differently (never written so): trust none of it
    pixels = np.zeros((len(tiles), num_classes), dtype=np.int64)
    for i, t in enumerate(tiles):
        counts = t.measures.class_pixels[:num_classes]
        pixels[i, :len(counts)] = counts
    rows = {key: np.array([t.measures.scalings[k].row for t in tiles], dtype=np.float64)
            for k, key in enumerate(keys)}
    return KnownMeasures(class_pixels=pixels, decoded_bytes=sum(t.measures.decoded_bytes for t in tiles), rows=rows)
