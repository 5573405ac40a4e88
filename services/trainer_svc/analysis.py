"""Analysis on a trainer node: a registered model predicts class-index masks for images, with the
same preprocessing as training (normalisation stored with the model) and sliding windows for
images larger than the training tile."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import PurePosixPath

import torch
from segtrain.trainer.v1 import trainer_pb2

from segcore import checkpoint, imaging, inference
from segcore.checkpoint import ModelMeta
from segcore.config import resolve_device
from segcore.imaging import Normalization
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.storage import ObjectStore, safe_key

CACHED_MODELS = 2


class Analyzer:
    def __init__(self, store: ObjectStore, device: str | None) -> None:
        self._store = store
        self._device = device
        self._models: OrderedDict[str, tuple[torch.nn.Module, ModelMeta]] = OrderedDict()
        self._lock = threading.Lock()

    def analyze(self, request: trainer_pb2.AnalyzeTilesRequest) -> trainer_pb2.AnalyzeTilesResponse:
        prefix = safe_key(request.output_prefix.rstrip("/"), field="output_prefix") + "/"
        model, meta = self._model(request.model.weights_uri)
        norm = Normalization.from_dict(meta.normalization)
        results: list[trainer_pb2.TileResult] = []
        written: list[str] = []
        try:
            for i, key in enumerate(request.image_keys):
                results.append(self._one(i, key, model, meta, norm, prefix, written))
        except BaseException:
            self._store.delete_many(written)  # no half-written analysis
            raise
        return trainer_pb2.AnalyzeTilesResponse(tiles=results)

    def _one(self, i: int, key: str, model: torch.nn.Module, meta: ModelMeta, norm: Normalization,
             prefix: str, written: list[str]) -> trainer_pb2.TileResult:
        name = PurePosixPath(key).name
        try:
            data = self._store.get(key)
        except NotFoundError:
            raise InvalidArgumentError.of(f"image_keys[{i}]", f"image {name!r} not found") from None
        try:
            image = imaging.decode_image(data, name)
        except Exception as exc:  # InvalidTileError names the tile
            raise InvalidArgumentError.of(f"image_keys[{i}]", str(exc)) from None
        with self._lock:  # one forward at a time per node: bounded memory
            mask = inference.predict_mask(model, image, norm, tile_size=meta.tile_size or None,
                                          device=self._device)
        out = f"{prefix}masks/{PurePosixPath(key).stem}.png"
        self._store.put(out, imaging.encode_mask_png(mask), content_type="image/png")
        written.append(out)
        counts = inference.class_pixel_counts(mask, len(meta.class_names))
        return trainer_pb2.TileResult(
            image_key=key, mask_uri=out, width=int(mask.shape[1]), height=int(mask.shape[0]),
            classes=[trainer_pb2.ClassPixels(class_index=c, pixel_count=n) for c, n in enumerate(counts)],
        )

    def _model(self, weights_uri: str) -> tuple[torch.nn.Module, ModelMeta]:
        with self._lock:
            if weights_uri in self._models:
                self._models.move_to_end(weights_uri)
                return self._models[weights_uri]
        model, meta = checkpoint.load_model(self._store.get(weights_uri))
        model.eval()
        model.to(resolve_device(self._device))  # None: CUDA when available, as for training
        with self._lock:
            self._models[weights_uri] = (model, meta)
            while len(self._models) > CACHED_MODELS:
                self._models.popitem(last=False)
        return model, meta
