"""Serialising trained models and resumable training state to bytes.

This module owns two on-disk formats:
* **model files** (``export_model`` / ``load_model``): a safetensors file whose
  header metadata carries ``ModelMeta`` as JSON. safetensors cannot execute
  code on load, so model files from users or object storage are safe to open,
  and the metadata can be read without touching the tensors
  (``read_model_meta``);
* **training state** (``save_training_state`` / ``load_training_state``): a
  ``torch.save`` archive of plain containers, loaded with
  ``weights_only=True`` so it cannot execute code either.
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors
import timm
import torch
import transformers
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from segcore.architectures import build_model
from segcore.errors import IncompatibleModelError, SegcoreError
from segcore.progress import EpochResult
from segcore.state import TrainingState, cpu_copy
from segcore.training import TrainConfig, TrainResult, resolve_device

MODEL_FORMAT = "segcore-model/1"
STATE_FORMAT = "segcore-training-state/1"
_META_KEY = "segcore_meta"
_FORMAT_KEY = "segcore_format"


@dataclass
class ModelMeta:
    """Everything needed to rebuild and correctly use an exported model."""

    architecture: str
    class_names: list[str]
    normalization: dict[str, list[float]]  # Normalization.to_dict()
    tile_size: int | None = None  # tile size used in training; a good inference window
    best_epoch: int | None = None
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)  # environment_info() at export
    device: str = ""  # device the model was trained on
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable caller data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from newer writers; dropping them keeps old readers working.
        return cls(**{k: v for k, v in data.items() if k in known})


def model_meta_for(
    config: TrainConfig,
    result: TrainResult,
    *,
    tile_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelMeta:
    """ModelMeta describing the outcome of ``train(config, ...)``."""
    device = resolve_device(config.device)
    return ModelMeta(
        architecture=config.architecture,
        class_names=list(config.class_names),
        normalization=result.normalization.to_dict(),
        tile_size=tile_size if tile_size is not None else config.crop_size,
        best_epoch=result.best_epoch,
        seed=config.seed,
        versions=environment_info(device),
        device=str(device),
        extra=dict(extra or {}),
    )


def environment_info(device: torch.device | str | None = None) -> dict[str, str]:
    """Library versions and the compute device, for reproducibility records."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    device_name = "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type != "cpu":
        device_name = str(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "device": device_name,
    }


# --------------------------------------------------------------------------- models


def export_model(state_dict: dict[str, torch.Tensor], meta: ModelMeta) -> bytes:
    """Model weights + metadata as safetensors bytes."""
    # safetensors refuses non-contiguous and storage-sharing tensors; private
    # contiguous CPU copies satisfy both.
    tensors = {k: v.contiguous() for k, v in cpu_copy(dict(state_dict)).items()}
    metadata = {_FORMAT_KEY: MODEL_FORMAT, _META_KEY: json.dumps(meta.to_dict())}
    return save_safetensors_bytes(tensors, metadata=metadata)


def read_model_meta(data: bytes) -> ModelMeta:
    """Read only the metadata of an exported model (no tensors are decoded)."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise IncompatibleModelError(f"not a safetensors model file: {exc}") from exc
    if metadata.get(_FORMAT_KEY) != MODEL_FORMAT:
        raise IncompatibleModelError(
            f"not a segcore model (format {metadata.get(_FORMAT_KEY)!r}, expected {MODEL_FORMAT!r})"
        )
    try:
        return ModelMeta.from_dict(json.loads(metadata[_META_KEY]))
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleModelError(f"model metadata is unreadable: {exc}") from exc


def load_model(data: bytes) -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild an exported model (in eval mode, on CPU) and return it with its metadata."""
    meta = read_model_meta(data)
    try:
        model = build_model(meta.architecture, len(meta.class_names))
    except SegcoreError as exc:
        raise IncompatibleModelError(f"model needs architecture {meta.architecture!r}: {exc}") from exc
    try:
        model.load_state_dict(load_safetensors_bytes(data), strict=True)
    except Exception as exc:  # safetensors and torch raise assorted types for bad data
        raise IncompatibleModelError(f"model weights do not fit {meta.architecture!r}: {exc}") from exc
    return model.eval(), meta


# ------------------------------------------------------------------- training state


def save_training_state(state: TrainingState) -> bytes:
    """Serialise a TrainingState to bytes (load with ``load_training_state``)."""
    payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    # EpochResult objects become dicts: weights_only loading accepts plain containers only.
    payload["history"] = [dataclasses.asdict(r) for r in state.history]
    payload["format"] = STATE_FORMAT
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_training_state(data: bytes) -> TrainingState:
    """Inverse of ``save_training_state``; never unpickles arbitrary objects."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/...
        raise IncompatibleModelError(f"training state is unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.pop("format", None) != STATE_FORMAT:
        raise IncompatibleModelError("not a segcore training state")
    payload["history"] = [EpochResult(**r) for r in payload["history"]]
    known = {f.name for f in dataclasses.fields(TrainingState)}
    return TrainingState(**{k: v for k, v in payload.items() if k in known})
