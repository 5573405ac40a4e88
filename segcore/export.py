"""A trained model in the formats other tools load, with no segtrain installed.

* ``hf``: a transformers ``save_pretrained`` directory (``config.json`` with ``id2label``,
  ``model.safetensors``) that ``UperNetForSemanticSegmentation.from_pretrained`` loads, and a
  ``preprocessor_config.json`` that holds the normalization and tile size the model expects;
* ``onnx``: ``model.onnx`` with dynamic batch, height and width (input ``pixel_values``, output
  ``logits``), opset ``ONNX_OPSET``;
* ``torchscript``: ``model.pt`` (``torch.jit.load``), traced, its forward returning the logits.

Every format takes what the network took in training: float32 ``N x 3 x H x W`` after the model's
normalization (``preprocessing`` spells it out), and returns logits ``N x classes x H x W`` (the
class of a pixel is their argmax). The ``onnx`` and ``torchscript`` files are checked against the
torch model before they are returned, on inputs of two batch sizes and two image sizes: the
largest absolute logit difference must stay within ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcore.checkpoint import ModelMeta
from segcore.errors import SegcoreError
from segcore.hyperparameters import MIN_INPUT_SIZE
from segcore.intensity import PERCENTILE, Normalization

FORMATS = ("hf", "onnx", "torchscript")
PREPROCESSOR_FILE = "preprocessor_config.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
ONNX_OPSET = 18
PARITY_TOLERANCE = 1e-3
PREPROCESSING_FORMAT = "segtrain-preprocessing/1"


class ExportError(SegcoreError):
    """The model could not be exported, or its export does not compute what the model does."""


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: file names relative to its directory, and for the formats that are
    checked, the largest absolute logit difference from torch and the input shapes it was seen on."""

    files: list[str]
    max_abs_difference: float | None = None
    checked_shapes: tuple[tuple[int, int, int, int], ...] = ()


def preprocessing(meta: ModelMeta) -> dict[str, Any]:
    """How an image becomes the model's input, for a reader without segtrain (the ``segtrain``
    block of the hf format's preprocessor config, and the README's example)."""
    norm = Normalization.from_dict(meta.normalization)
    spec: dict[str, Any] = {
        "format": PREPROCESSING_FORMAT,
        "input": "float32 N x 3 x H x W (channels first); grey images repeated on 3 channels, two-channel "
                 "images with an empty third",
        "normalization": norm.to_dict(),
        "steps": _steps(norm),
        "tile_size": meta.tile_size,
        "min_input_size": MIN_INPUT_SIZE,
        "output": "logits N x classes x H x W; the class of a pixel is their argmax",
        "class_names": list(meta.class_names),
    }
    return spec


def _steps(norm: Normalization) -> list[str]:
    if norm.mode == PERCENTILE:
        first = (f"per image, over all channels (over one for grey images, whose channels are equal; per "
                 f"channel for two-channel images, whose third is empty), map the "
                 f"{norm.percentile_low:g}th percentile of its values to 0 and the {norm.percentile_high:g}th to 1 "
                 "(not clipped; a constant image maps to 0)")
    else:
        first = ("divide integer pixels by their type's maximum (uint8: 255, uint16: 65535; signed types shifted "
                 "by their minimum first); float pixels stay as they are")
    return [first, "subtract `mean` and divide by `std`, per channel"]


def export(model: torch.nn.Module, meta: ModelMeta, out_dir: Path, fmt: str) -> Exported:
    """Writes `model` (a transformers UperNetForSemanticSegmentation, as segcore builds them) in
    format `fmt` into the empty directory `out_dir`. Raises ExportError."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    if fmt == "hf":
        _save_hf(model, meta, out_dir)
        return Exported(files=_files(out_dir))
    shapes = check_shapes(meta.tile_size)
    if fmt == "onnx":
        _save_onnx(model, out_dir / ONNX_FILE, shapes[0])
        difference = _onnx_difference(model, out_dir / ONNX_FILE, shapes)
    else:
        _save_torchscript(model, out_dir / TORCHSCRIPT_FILE, shapes[0])
        difference = _torchscript_difference(model, out_dir / TORCHSCRIPT_FILE, shapes)
    if not difference <= PARITY_TOLERANCE:  # NaN included
        raise ExportError(f"the {fmt} export computes different logits from the model (largest absolute "
                          f"difference {difference:.3g} > {PARITY_TOLERANCE:g}); it was not published")
    return Exported(files=_files(out_dir), max_abs_difference=difference, checked_shapes=tuple(shapes))


def check_shapes(tile_size: int | None) -> list[tuple[int, int, int, int]]:
    """The inputs an export is checked on: two batch sizes, two image sizes (one not square), at
    most the model's tile (capped at 256 to keep the check within seconds on a CPU), one of them not
    a multiple of the network's stride."""
    side = max(64, min(tile_size or 256, 256)) // 32 * 32
    return [(2, 3, side, side), (1, 3, side // 2 + 8, side - 24)]


def _files(out_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())


class _Logits(torch.nn.Module):
    """The model with a plain tensor in and out (what ONNX and TorchScript record)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------- transformers

def _save_hf(model: torch.nn.Module, meta: ModelMeta, out_dir: Path) -> None:
    config = getattr(model, "config", None)
    save = getattr(model, "save_pretrained", None)
    if config is None or save is None:
        raise ExportError(f"{meta.architecture} is not a transformers model; it has no hf format")
    config.id2label = dict(enumerate(meta.class_names))
    config.label2id = {name: i for i, name in enumerate(meta.class_names)}
    # Loading must never reach for the hub: the backbone is in the weights.
    backbone = getattr(config, "backbone_config", None)
    if backbone is not None and hasattr(backbone, "use_pretrained_backbone"):
        backbone.use_pretrained_backbone = False
    if hasattr(config, "use_pretrained_backbone"):
        config.use_pretrained_backbone = False
    save(str(out_dir), safe_serialization=True)
    (out_dir / PREPROCESSOR_FILE).write_text(json.dumps(_image_processor_config(meta), indent=2) + "\n")


def _image_processor_config(meta: ModelMeta) -> dict[str, Any]:
    """A SegformerImageProcessor configuration (what UperNet checkpoints on the hub use) for 8-bit
    images, and the ``segtrain`` block with the normalization for every image type."""
    norm = Normalization.from_dict(meta.normalization)
    side = meta.tile_size or 512
    return {
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": False,  # tiles go in at their size; larger images in windows of tile_size
        "size": {"height": side, "width": side},
        # For percentile normalization the per-image scaling is the `segtrain` block's first step.
        "do_rescale": norm.mode != PERCENTILE,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(norm.mean),
        "image_std": list(norm.std),
        "do_reduce_labels": False,
        "segtrain": preprocessing(meta),
    }


# ------------------------------------------------------------------------------------- ONNX

class _AdaptiveAvgPool2d(torch.nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two matrix products whose bins follow the input's size: torch's
    ONNX exporter records the indices of adaptive pooling for the example's size only, so UperNet's
    pyramid pooling would fail (or be wrong) on any other image size."""

    def __init__(self, output_size: Any) -> None:
        super().__init__()
        height, width = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if height is None or width is None:
            raise ExportError("adaptive pooling that keeps an input dimension is not supported")
        self.height, self.width = height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _bin_weights(x.shape[-2], self.height).to(x.dtype)
        columns = _bin_weights(x.shape[-1], self.width).to(x.dtype)
        return rows @ x @ columns.transpose(0, 1)


def _bin_weights(length: Any, bins: int) -> torch.Tensor:  # an int, or a SymInt while exporting
    """``bins x length``: row i averages adaptive pooling's bin i, ``[floor(i*L/n), ceil((i+1)*L/n))``."""
    i = torch.arange(bins)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = torch.div((i + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length)
    member = ((position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])).float()
    return member / member.sum(dim=1, keepdim=True)


def _exportable(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose adaptive pooling follows the input's size once exported."""
    copy = deepcopy(model)
    for parent in list(copy.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.AdaptiveAvgPool2d):
                replacement = _AdaptiveAvgPool2d(child.output_size)
                setattr(parent, name, replacement)
                layers = getattr(parent, "layers", None)  # UperNet's pooling blocks also keep a plain list
                if isinstance(layers, list):
                    layers[:] = [replacement if layer is child else layer for layer in layers]
    return copy


def _save_onnx(model: torch.nn.Module, path: Path, shape: tuple[int, int, int, int]) -> None:
    example = torch.randn(*shape)
    batch, height, width = (torch.export.Dim("batch", min=1, max=1024),
                            torch.export.Dim("height", min=MIN_INPUT_SIZE, max=16384),
                            torch.export.Dim("width", min=MIN_INPUT_SIZE, max=16384))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Logits(_exportable(model)), (example,), dynamo=True, opset_version=ONNX_OPSET, external_data=False,
                input_names=["pixel_values"], output_names=["logits"], verbose=False,
                dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}})
    except Exception as exc:  # torch.export raises assorted types for unsupported models
        raise ExportError(f"torch could not export the model to ONNX: {exc}") from exc
    if program is None:
        raise ExportError("torch produced no ONNX program")
    program.save(str(path), external_data=False)


def _onnx_difference(model: torch.nn.Module, path: Path, shapes: Sequence[tuple[int, int, int, int]]) -> float:
    import onnxruntime  # only where exports are made: a node that never exports never loads it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in shapes:
        pixels = _check_input(shape)
        (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
        worst = max(worst, _difference(model, pixels, torch.from_numpy(logits)))
    return worst


# ------------------------------------------------------------------------------ TorchScript

def _save_torchscript(model: torch.nn.Module, path: Path, shape: tuple[int, int, int, int]) -> None:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Logits(model), torch.randn(*shape), check_trace=False)
    except Exception as exc:
        raise ExportError(f"torch could not trace the model: {exc}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit.save is deprecated": still what torch.jit.load reads
        torch.jit.save(traced, str(path))


def _torchscript_difference(model: torch.nn.Module, path: Path,
                            shapes: Sequence[tuple[int, int, int, int]]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    worst = 0.0
    for shape in shapes:
        pixels = _check_input(shape)
        with torch.no_grad():
            worst = max(worst, _difference(model, pixels, loaded(pixels)))
    return worst


# ------------------------------------------------------------------------------------ checks

def _check_input(shape: tuple[int, int, int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator)


def _difference(model: torch.nn.Module, pixels: torch.Tensor, logits: torch.Tensor) -> float:
    with torch.no_grad():
        expected = _Logits(model)(pixels)
    if tuple(logits.shape) != tuple(expected.shape):
        return math.inf
    return float((logits.float() - expected.float()).abs().max())
