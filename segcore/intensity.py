"""Intensity normalization for any microscopy data: 8/12/16-bit, signed, float in any units.

This module owns how pixel values in their native units become what the network sees, and how
that choice is made. It uses numpy only (no torch), so the pipeline service can profile a set
and resolve "auto" without the training stack.

A ``Normalization`` is two steps, stored with every model and applied identically at analysis:
1. a per-image *scaling* to roughly 0..1:
   * ``percentile``: per image, the ``percentile_low`` percentile maps to 0 and
     ``percentile_high`` to 1 (1 and 99.8 by default, as microscopy tools do), over all channels
     of a colour image (its colour balance is kept) and per channel of a two-channel image.
     Invariant to offset, exposure and bit depth, so a 16-bit image whose signal fills 0.4 % of
     the range trains as well as an 8-bit one;
   * ``dataset`` and ``imagenet``: integers divided by their type's maximum (signed types shifted
     by their minimum first), floats taken as they are;
2. a per-channel standardisation ``(x - mean) / std``: statistics of the training set's scaled
   images (``dataset``, ``percentile``), or ImageNet's (``imagenet``, for pretrained RGB
   backbones).

``choose_normalization`` resolves ``auto`` from an ``ImageProfile``: percentile for
single-channel or non-8-bit data, imagenet for 8-bit RGB with pretrained backbone weights,
dataset for other 8-bit RGB; a fine-tuned model keeps its parent's normalization.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcore.errors import InvalidParameterError

PERCENTILE, DATASET, IMAGENET = "percentile", "dataset", "imagenet"
MODES = (PERCENTILE, DATASET, IMAGENET)
# Keeps a constant channel (e.g. an empty third channel) from dividing by zero.
_MIN_STD = 1e-6
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """How an ``H x W x 3`` image in native units becomes network input (see the module doc).
    ``mean`` and ``std`` are per channel, in the units after the per-image scaling."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = DATASET
    percentile_low: float = 1.0
    percentile_high: float = 99.8

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode, "mean": list(self.mean), "std": list(self.std)}
        if self.mode == PERCENTILE:
            data |= {"percentile_low": self.percentile_low, "percentile_high": self.percentile_high}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        """Inverse of ``to_dict``; a dict without a mode (models saved before modes existed) is a
        ``dataset`` normalization, which is exactly what those models applied."""
        mean = tuple(float(v) for v in data["mean"])
        std = tuple(float(v) for v in data["std"])
        mode = str(data.get("mode", DATASET))
        if len(mean) != 3 or len(std) != 3:
            raise InvalidParameterError("normalization", "mean and std need 3 values each")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise InvalidParameterError("normalization", f"std must be positive, got {std}")
        if mode not in MODES:
            raise InvalidParameterError("normalization", f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        low = float(data.get("percentile_low", 1.0))
        high = float(data.get("percentile_high", 99.8))
        return cls(mean=mean, std=std, mode=mode, percentile_low=low, percentile_high=high)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.mode == PERCENTILE:
            return (f"percentile: per image, the {self.percentile_low:g}th percentile -> 0 and the "
                    f"{self.percentile_high:g}th -> 1, then training-set mean/std")
        if self.mode == IMAGENET:
            return "imagenet: pixels scaled by their type's range, then ImageNet mean/std"
        return "dataset: pixels scaled by their type's range, then training-set mean/std"


IMAGENET_NORMALIZATION = Normalization(mean=_IMAGENET_MEAN, std=_IMAGENET_STD, mode=IMAGENET)


# ------------------------------------------------------------------------- scaling


def unit_scale(image: np.ndarray) -> np.ndarray:
    """Integers divided by their type's maximum (signed ones shifted by the minimum first);
    floats as they are (any units). float32, same shape."""
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        if info.min < 0:
            return ((image.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
        return (image.astype(np.float32) / np.float32(info.max)).astype(np.float32)
    return image.astype(np.float32, copy=False)


def percentile_scale(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """The ``low`` percentile -> 0, ``high`` -> 1 (not clipped), for an ``H x W x 3`` image.

    Colour images are measured over all channels at once, which keeps their colour balance (a
    stain's hue is what tells nuclei from stroma); grey images (three equal channels) likewise;
    two-channel images (third channel empty) per channel, since independent fluorophores have
    unrelated ranges. A constant image or channel maps to 0.
    """
    pixels = image.astype(np.float32, copy=False)
    if _is_two_channel(pixels):
        bounds = np.percentile(pixels[:, :, :2].reshape(-1, 2), [low, high], axis=0)
        lo, hi = np.append(bounds[0], 0.0), np.append(bounds[1], 1.0)
    else:
        measured = pixels[:, :, 0] if _is_grey(pixels) else pixels
        lo, hi = (np.asarray(v) for v in np.percentile(measured, [low, high]))
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    lo = lo.astype(np.float32)
    return ((pixels - lo) / span).astype(np.float32)


def _is_grey(pixels: np.ndarray) -> bool:
    return all(np.array_equal(pixels[:, :, 0], pixels[:, :, c]) for c in range(1, pixels.shape[2]))


def _is_two_channel(pixels: np.ndarray) -> bool:
    return not pixels[:, :, 2].any() and not np.array_equal(pixels[:, :, 0], pixels[:, :, 1])


def scaled(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """Step 1 of ``norm``: the per-image scaling of an ``H x W x 3`` image."""
    if norm.mode == PERCENTILE:
        return percentile_scale(image, norm.percentile_low, norm.percentile_high)
    return unit_scale(image)


def standardized(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """Both steps: float32 ``H x W x 3`` network input."""
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    return ((scaled(image, norm) - mean) / std).astype(np.float32)


def compute_normalization(images: Iterable[np.ndarray], mode: str = DATASET, *, percentile_low: float = 1.0,
                          percentile_high: float = 99.8) -> Normalization:
    """A ``mode`` normalization whose mean/std are those of ``images`` after the per-image
    scaling (ImageNet's for ``imagenet``). One pass, running float64 sums: memory stays flat."""
    if mode == IMAGENET:
        return IMAGENET_NORMALIZATION
    probe = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), mode=mode, percentile_low=percentile_low,
                          percentile_high=percentile_high)
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for image in images:
        flat = scaled(np.asarray(image), probe).astype(np.float64).reshape(-1, 3)
        total += flat.sum(axis=0)
        total_sq += np.square(flat).sum(axis=0)
        count += flat.shape[0]
    if count == 0:
        raise InvalidParameterError("images", "need at least one image to compute normalization")
    mean = total / count
    std = np.maximum(np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0)), _MIN_STD)
    return Normalization(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                         mode=mode, percentile_low=percentile_low, percentile_high=percentile_high)


# ------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class ImageProfile:
    """What a set of images is made of: enough to choose a normalization."""

    pixel_types: tuple[str, ...] = ()
    single_channel: bool = True
    min_value: float = math.inf
    max_value: float = -math.inf

    def merged(self, other: ImageProfile) -> ImageProfile:
        return ImageProfile(pixel_types=tuple(sorted(set(self.pixel_types) | set(other.pixel_types))),
                            single_channel=self.single_channel and other.single_channel,
                            min_value=min(self.min_value, other.min_value),
                            max_value=max(self.max_value, other.max_value))

    def describe(self) -> str:
        kinds = "/".join(self.pixel_types) or "no"
        layout = "single-channel" if self.single_channel else "multi-channel"
        text = f"{kinds} {layout} images with values {self.min_value:g}..{self.max_value:g}"
        if len(self.pixel_types) == 1 and np.issubdtype(np.dtype(self.pixel_types[0]), np.integer):
            info = np.iinfo(np.dtype(self.pixel_types[0]))
            used = (self.max_value - self.min_value) / (int(info.max) - int(info.min))
            text += f" ({100 * used:.3g} % of the {self.pixel_types[0]} range)"
        return text


def profile_image(image: np.ndarray) -> ImageProfile:
    """Profile of one decoded ``H x W x 3`` image (grey images have three equal channels)."""
    single = all(np.array_equal(image[:, :, 0], image[:, :, c]) for c in range(1, image.shape[2]))
    return ImageProfile(pixel_types=(str(image.dtype),), single_channel=single,
                        min_value=float(image.min()), max_value=float(image.max()))


def profile_images(images: Iterable[np.ndarray]) -> ImageProfile:
    profile = ImageProfile()
    for image in images:
        profile = profile.merged(profile_image(image))
    return profile


def choose_normalization(requested: str, profile: ImageProfile | None, *, pretrained: bool = False,
                         parent_mode: str | None = None) -> tuple[str, str]:
    """The concrete mode for ``requested`` ("auto" or a mode), and why, in words."""
    if requested != "auto":
        return requested, f"{requested}: asked for"
    if parent_mode is not None:
        return parent_mode, f"auto chose {parent_mode}: the parent model's normalization, which its weights expect"
    if profile is None or not profile.pixel_types:
        return DATASET, "auto chose dataset: the training set has no image profile (created before profiles)"
    eight_bit = profile.pixel_types == ("uint8",)
    if profile.single_channel or not eight_bit:
        return PERCENTILE, (f"auto chose percentile: {profile.describe()}; per-image percentiles make any bit "
                            "depth, offset and exposure look alike")
    if pretrained:
        return IMAGENET, f"auto chose imagenet: {profile.describe()} and a pretrained backbone"
    return DATASET, f"auto chose dataset: {profile.describe()}"
