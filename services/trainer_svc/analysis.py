"""Analysis on a trainer node: a registered model predicts class-index masks for images, with the
same preprocessing as training (normalisation stored with the model) and sliding windows for
images larger than the training tile."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import PurePosixPath

import numpy as np
import torch
from segtrain.trainer.v1 import trainer_pb2

from segcore import checkpoint, imaging, inference, limits
from segcore.checkpoint import ModelMeta
from segcore.config import resolve_device
from segcore.errors import InvalidTileError
from segcore.imaging import Normalization
from services.common import object_keys
from services.common.errors import CancelledError, InvalidArgumentError, NotFoundError
from services.common.storage import ObjectStore, ObjectTooLargeError, verified

CACHED_MODELS = 2
BATCH = 8  # tiles per forward pass (those that fit one window and share a shape)


def load_analysis_model(data: bytes, device: str | None) -> tuple[torch.nn.Module, ModelMeta]:
    """An exported model (already checked against its sha256), in eval mode on its device (None:
    CUDA when available, as for training)."""
    model, meta = checkpoint.load_model(data)
    model.eval()
    model.to(resolve_device(device))
    return model, meta


class Analyzer:
    """Runs analyses as a pipeline: a pool of I/O threads fetches and decodes the next tiles and
    encodes and stores finished masks while one long-lived inference thread runs batched forwards
    (torch is fastest on a thread that keeps its thread pool; one batch at a time bounds memory)."""

    def __init__(self, store: ObjectStore, device: str | None, num_threads: int | None = None) -> None:
        self._store = store
        self._device = device
        self._models: OrderedDict[str, tuple[torch.nn.Module, ModelMeta]] = OrderedDict()
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="analysis-io")
        self._inference = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference",
            initializer=(lambda: torch.set_num_threads(num_threads)) if num_threads else None)

    def analyze(self, request: trainer_pb2.AnalyzeTilesRequest,
                is_active: Callable[[], bool] = lambda: True) -> trainer_pb2.AnalyzeTilesResponse:
        """Masks for the request's images; stops (and removes what it wrote) once `is_active`
        turns false: its caller gave up."""
        prefix = object_keys.check_analysis_prefix(request.output_prefix, field="output_prefix")
        model, meta = self._model(request.model)
        norm = Normalization.from_dict(meta.normalization)
        keys = list(request.image_keys)
        stored: list[Future[trainer_pb2.TileResult]] = []
        images: list[Future[np.ndarray]] = []
        try:
            # Decoding runs up to two batches ahead of the forwards; masks are stored behind them.
            images += [self._io.submit(self._read, i, key) for i, key in enumerate(keys[: 2 * BATCH])]
            for start in range(0, len(keys), BATCH):
                if not is_active():
                    raise CancelledError("the caller gave up: the analysis was stopped")
                ahead = range(start + 2 * BATCH, min(start + 3 * BATCH, len(keys)))
                images += [self._io.submit(self._read, i, keys[i]) for i in ahead]
                batch = [f.result() for f in images[start : start + BATCH]]
                masks = self._inference.submit(inference.predict_masks, model, batch, norm, batch_size=BATCH,
                                               tile_size=meta.tile_size or None, device=self._device).result()
                stored += [self._io.submit(self._write, key, mask, prefix, len(meta.class_names))
                           for key, mask in zip(keys[start : start + BATCH], masks, strict=True)]
            results = [f.result() for f in stored]
        except BaseException:
            for f in [*images, *stored]:
                f.cancel()
            wait(stored)
            self._store.delete_many([object_keys.analysis_mask(prefix, k) for k in keys])  # no half analysis
            raise
        return trainer_pb2.AnalyzeTilesResponse(tiles=results)

    def _read(self, i: int, key: str) -> np.ndarray:
        name = PurePosixPath(key).name
        try:
            data = self._store.get(key, max_bytes=limits.MAX_IMAGE_BYTES)
        except NotFoundError:
            raise InvalidArgumentError.of(f"image_keys[{i}]", f"image {name!r} not found") from None
        except ObjectTooLargeError as exc:
            raise InvalidArgumentError.of(f"image_keys[{i}]", f"image {name!r} {exc.message}") from None
        try:
            return imaging.decode_image(data, name)
        except InvalidTileError as exc:
            raise InvalidArgumentError.of(f"image_keys[{i}]", str(exc)) from None

    def _write(self, key: str, mask: np.ndarray, prefix: str, num_classes: int) -> trainer_pb2.TileResult:
        out = object_keys.analysis_mask(prefix, key)
        self._store.put(out, imaging.encode_mask_png(mask), content_type="image/png")
        counts = inference.class_pixel_counts(mask, num_classes)
        return trainer_pb2.TileResult(
            image_key=key, mask_uri=out, width=int(mask.shape[1]), height=int(mask.shape[0]),
            classes=[trainer_pb2.ClassPixels(class_index=c, pixel_count=n) for c, n in enumerate(counts)],
        )

    def _model(self, ref: trainer_pb2.ModelRef) -> tuple[torch.nn.Module, ModelMeta]:
        """The model, from the cache or loaded from storage after its sha256 check."""
        cache_key = f"{ref.weights_uri}@{ref.weights_sha256}"
        with self._lock:
            if cache_key in self._models:
                self._models.move_to_end(cache_key)
                return self._models[cache_key]
        object_keys.check_model_key(ref.weights_uri, field="model.weights_uri")
        data = verified(self._store.get(ref.weights_uri), key=ref.weights_uri, sha256=ref.weights_sha256)
        model, meta = load_analysis_model(data, self._device)
        with self._lock:
            self._models[cache_key] = (model, meta)
            while len(self._models) > CACHED_MODELS:
                self._models.popitem(last=False)
        return model, meta
