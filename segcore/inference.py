"""Prediction of class masks for whole images.

This module owns inference: the same normalisation as training, then either
one forward pass or, for images larger than ``tile_size``, a sliding window
whose overlapping logits are averaged. Averaging logits (rather than stitching
hard labels) removes the seams that appear where a window's border context is
poor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segcore.data import MIN_INPUT_SIZE
from segcore.errors import InvalidParameterError
from segcore.imaging import Normalization
from segcore.intensity import standardized
from segcore.metrics import argmax_classes


def normalize(image: np.ndarray, norm: Normalization) -> torch.Tensor:
    """Network input for an ``H x W x 3`` image in native units: a float32 ``C x H x W`` tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidParameterError("image", f"expected H x W x 3, got shape {image.shape}")
    return torch.from_numpy(standardized(image, norm)).permute(2, 0, 1).contiguous()


_WINDOWS_PER_FORWARD = 4  # windows batched per forward pass; bounds peak memory


def predict_mask(
    model: torch.nn.Module,
    image: np.ndarray,
    norm: Normalization,
    *,
    tile_size: int | None = None,
    overlap: int = 32,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Class index per pixel (int64 ``H x W``) for a float32 ``H x W x 3`` image in [0, 1].

    ``tile_size=None`` runs the whole image at once. Otherwise windows of
    ``tile_size`` with ``overlap`` pixels of overlap cover the image. The model
    is put in eval mode; ``device`` defaults to where its parameters are.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidParameterError("image", f"expected H x W x 3, got shape {image.shape}")
    if tile_size is not None:
        if tile_size < MIN_INPUT_SIZE:
            raise InvalidParameterError("tile_size", f"must be at least {MIN_INPUT_SIZE}, got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise InvalidParameterError("overlap", f"must be in [0, tile_size), got {overlap}")
    target = torch.device(device) if device is not None else _model_device(model)
    model.eval()
    pixels = normalize(image, norm)
    height, width = image.shape[:2]
    window_h = min(tile_size or height, height)
    window_w = min(tile_size or width, width)
    windows = [
        (top, left)
        for top in window_starts(height, window_h, overlap)
        for left in window_starts(width, window_w, overlap)
    ]
    logit_sum: torch.Tensor | None = None
    hits = torch.zeros(height, width)
    with torch.inference_mode(), _autocast(target):
        for chunk in _chunks(windows, _WINDOWS_PER_FORWARD):
            crops = torch.stack([pixels[:, t : t + window_h, lf : lf + window_w] for t, lf in chunk])
            logits = _forward(model, crops.to(target), window_h, window_w).float().cpu()
            if logit_sum is None:
                logit_sum = torch.zeros(logits.shape[1], height, width)
            for (top, left), window_logits in zip(chunk, logits, strict=True):
                logit_sum[:, top : top + window_h, left : left + window_w] += window_logits
                hits[top : top + window_h, left : left + window_w] += 1
    assert logit_sum is not None  # at least one window always exists
    return argmax_classes(logit_sum / hits, dim=0).numpy().astype(np.int64)


def predict_masks(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    norm: Normalization,
    *,
    tile_size: int | None = None,
    overlap: int = 32,
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """``predict_mask`` for several images, in order. Images that fit in one window and share a
    shape go through the network together (one forward per ``batch_size`` of them), which is
    what makes analysing many tiles fast; larger images take the sliding-window path."""
    masks: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        fits = tile_size is None or max(image.shape[:2]) <= tile_size
        if fits and image.ndim == 3 and image.shape[2] == 3:
            groups.setdefault(image.shape, []).append(i)
        else:
            masks[i] = predict_mask(model, image, norm, tile_size=tile_size, overlap=overlap, device=device)
    target = torch.device(device) if device is not None else _model_device(model)
    model.eval()
    with torch.inference_mode(), _autocast(target):
        for (height, width, _), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = torch.stack([normalize(images[i], norm) for i in chunk])
                logits = _forward(model, pixels.to(target), height, width).float().cpu()
                for i, image_logits in zip(chunk, logits, strict=True):
                    masks[i] = argmax_classes(image_logits, dim=0).numpy().astype(np.int64)
    return [m for m in masks if m is not None]


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)``; the last one ends flush."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)  # flush with the edge instead of padding
    return starts


def class_pixel_counts(mask: np.ndarray, num_classes: int) -> list[int]:
    """Pixels per class index ``0..num_classes-1``; other values (e.g. 255) are not counted."""
    flat = np.asarray(mask).reshape(-1)
    flat = flat[(flat >= 0) & (flat < num_classes)]
    return [int(c) for c in np.bincount(flat.astype(np.int64), minlength=num_classes)[:num_classes]]


def _forward(model: torch.nn.Module, crops: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # The network needs at least 32 x 32 input; pad small images and crop back.
    pad_h, pad_w = max(0, MIN_INPUT_SIZE - height), max(0, MIN_INPUT_SIZE - width)
    if pad_h or pad_w:
        crops = F.pad(crops, (0, pad_w, 0, pad_h))
    if crops.device.type == "cuda":
        crops = crops.contiguous(memory_format=torch.channels_last)
    logits = model(pixel_values=crops).logits
    if logits.shape[-2:] != crops.shape[-2:]:
        logits = F.interpolate(logits.float(), size=crops.shape[-2:], mode="bilinear", align_corners=False)
    return logits[:, :, :height, :width]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _chunks(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
