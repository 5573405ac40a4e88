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

import dataclasses
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
    return _applied(image, *scaling(image, Normalization((0.0,) * 3, (1.0,) * 3, mode=DATASET)))


def percentile_scale(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """The ``low`` percentile -> 0, ``high`` -> 1 (not clipped), for an ``H x W x 3`` image.

    Colour images are measured over all channels at once, which keeps their colour balance (a
    stain's hue is what tells nuclei from stroma); grey images (three equal channels) likewise;
    two-channel images (third channel empty) per channel, since independent fluorophores have
    unrelated ranges. A constant image or channel maps to 0.
    """
    return _applied(image, *scaling(image, Normalization((0.0,) * 3, (1.0,) * 3, mode=PERCENTILE,
                                                         percentile_low=low, percentile_high=high)))


def scaled(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """Step 1 of ``norm``: the per-image scaling of an ``H x W x 3`` image."""
    return _applied(image, *scaling(image, norm))


def standardized(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """Both steps: float32 ``H x W x 3`` network input."""
    return _applied(image, *input_affine(image, norm))


def scaling(image: np.ndarray, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of ``norm`` for this ``H x W x 3`` image as a per-channel affine map: scaled pixels
    are ``image * scale + offset`` (two float64 arrays of 3)."""
    measured = measure(image, norm.mode, norm.percentile_low, norm.percentile_high, moments=False)
    return measured.scale, measured.offset


def input_affine(image: np.ndarray, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Both steps of ``norm`` as one per-channel affine map (see ``scaling``): network input is
    ``image * scale + offset``."""
    return measure(image, norm.mode, norm.percentile_low, norm.percentile_high, moments=False).standardizing(norm)


def apply_affine(image: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``image * scale + offset`` per channel, float32 (the part of an image that is used)."""
    return _applied(image, scale, offset)


@dataclass(frozen=True)
class ImageMeasures:
    """One pass over an ``H x W x 3`` image: its per-image scaling as an affine map (scaled pixels
    are ``image * scale + offset``) and the per-channel moments of its native values, float64.
    Integers of up to 16 bits are measured from value counts (no sort, no float copy)."""

    scale: np.ndarray
    offset: np.ndarray
    count: int  # pixels per channel
    sums: np.ndarray
    squares: np.ndarray

    def standardizing(self, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
        """Both steps of `norm` as one affine map: network input is ``image * scale + offset``."""
        mean, std = np.asarray(norm.mean, dtype=np.float64), np.asarray(norm.std, dtype=np.float64)
        return self.scale / std, (self.offset - mean) / std

    def row(self) -> np.ndarray:
        """The measures as 13 float64s (a set's measures are an N x 13 array)."""
        return np.concatenate([self.scale, self.offset, self.sums, self.squares, [self.count]])

    @classmethod
    def from_row(cls, row: np.ndarray) -> ImageMeasures:
        return cls(row[0:3], row[3:6], int(row[12]), row[6:9], row[9:12])

    def moments_after(self, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sums, sums of squares) per channel of ``image * scale + offset``, without computing it."""
        sums = scale * self.sums + self.count * offset
        squares = np.square(scale) * self.squares + 2 * scale * offset * self.sums + self.count * np.square(offset)
        return sums, squares


def measure(image: np.ndarray, mode: str, low: float = 1.0, high: float = 99.8, *, moments: bool = True
            ) -> ImageMeasures:
    """The ``ImageMeasures`` of `image` under a `mode` scaling (the moments skipped unless asked)."""
    grey = _is_grey(image)
    channels = [image[:, :, 0]] if grey else [image[:, :, c] for c in range(3)]
    counts = [_value_counts(c) for c in channels]
    if mode == PERCENTILE:
        scale, offset = _percentile_scaling(image, channels, counts, grey, low, high)
    else:
        scale, offset = _unit_scaling(image)
    sums, squares = np.zeros(3), np.zeros(3)
    for c, (values, levels) in enumerate(zip(channels, counts, strict=True)) if moments else ():
        if levels is not None:
            base, tally = levels
            value = np.arange(tally.size, dtype=np.float64) + base
            sums[c], squares[c] = tally @ value, tally @ np.square(value)
        else:
            flat = values.astype(np.float64).ravel()
            sums[c], squares[c] = flat.sum(), flat @ flat
    if grey:
        sums[1:], squares[1:] = sums[0], squares[0]
    return ImageMeasures(scale, offset, image.shape[0] * image.shape[1], sums, squares)


ScalingKey = tuple[str, float, float]


def scaling_key(mode: str, low: float = 1.0, high: float = 99.8) -> ScalingKey:
    """Which measures a normalization `mode` needs: percentile ones depend on its two
    percentiles; ``dataset`` and ``imagenet`` both scale by the type's range."""
    return (PERCENTILE, float(low), float(high)) if mode == PERCENTILE else (DATASET, 0.0, 0.0)


def measure_scalings(image: np.ndarray, low: float, high: float) -> dict[ScalingKey, ImageMeasures]:
    """`image` under every per-image scaling a job may use (percentile with `low` and `high`, and
    the type's range), from one pass over its values."""
    measured = measure(image, PERCENTILE, low, high)
    scale, offset = _unit_scaling(image)
    return {scaling_key(PERCENTILE, low, high): measured,
            scaling_key(DATASET): dataclasses.replace(measured, scale=scale, offset=offset)}


def _applied(image: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32)  # always a copy: the result is written in place
    out *= scale.astype(np.float32)
    out += offset.astype(np.float32)
    return out


def _unit_scaling(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        span = float(info.max) - float(min(info.min, 0))
        return np.full(3, 1.0 / span), np.full(3, -float(min(info.min, 0)) / span)
    return np.ones(3), np.zeros(3)  # floats (and booleans) as they are


_Levels = tuple[int, np.ndarray] | None


def _percentile_scaling(image: np.ndarray, channels: list[np.ndarray], counts: list[_Levels], grey: bool,
                        low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    if not grey and _is_two_channel(image):
        bounds = [_percentiles(channels[c], counts[c], (low, high)) for c in range(2)]
        lo, hi = np.array([bounds[0][0], bounds[1][0], 0.0]), np.array([bounds[0][1], bounds[1][1], 1.0])
    elif grey:
        lo, hi = (np.full(3, v) for v in _percentiles(channels[0], counts[0], (low, high)))
    else:  # colour: all channels at once
        pooled = None if any(c is None for c in counts) else _pooled(counts)  # type: ignore[arg-type]
        lo, hi = (np.full(3, v) for v in _percentiles(image, pooled, (low, high)))
    span = np.where(hi > lo, hi - lo, 1.0)
    return 1.0 / span, -lo / span


def _pooled(counts: list[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    base = min(b for b, _ in counts)
    size = max(b + t.size for b, t in counts) - base
    total = np.zeros(size, dtype=np.int64)
    for b, tally in counts:
        total[b - base : b - base + tally.size] += tally
    return base, total


def _percentiles(values: np.ndarray, levels: _Levels, qs: tuple[float, float]) -> np.ndarray:
    """np.percentile's default (linear) percentiles of `values`, from their value counts when
    known (integers of up to 16 bits)."""
    if levels is None:
        return np.percentile(values, qs).astype(np.float64)
    base, counts = levels
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        position = q / 100.0 * (n - 1)
        k = math.floor(position)
        below, above = (float(np.searchsorted(cumulative, i, side="right")) for i in (k, min(k + 1, n - 1)))
        out.append(base + below + (above - below) * (position - k))
    return np.asarray(out)


def _value_counts(values: np.ndarray) -> _Levels:
    """(smallest value, counts of each value from it) for integers of up to 16 bits; None for
    other types, which go the general way."""
    if values.dtype.kind not in "uib" or values.dtype.itemsize > 2:
        return None
    flat = values.ravel()
    if values.dtype.kind == "i":
        base = int(flat.min())
        return base, np.bincount(flat.astype(np.int32) - base)
    return 0, np.bincount(flat.view(np.uint8) if values.dtype == np.bool_ else flat)


def _is_grey(pixels: np.ndarray) -> bool:
    return all(np.array_equal(pixels[:, :, 0], pixels[:, :, c]) for c in range(1, pixels.shape[2]))


def _is_two_channel(pixels: np.ndarray) -> bool:
    return not pixels[:, :, 2].any() and not np.array_equal(pixels[:, :, 0], pixels[:, :, 1])


def compute_normalization(images: Iterable[np.ndarray], mode: str = DATASET, *, percentile_low: float = 1.0,
                          percentile_high: float = 99.8) -> Normalization:
    """A ``mode`` normalization whose mean/std are those of ``images`` after the per-image
    scaling (ImageNet's for ``imagenet``). One pass, running float64 sums: memory stays flat."""
    measures = (measure(np.asarray(i), mode, percentile_low, percentile_high) for i in images)
    return normalization_of(measures, mode, percentile_low=percentile_low, percentile_high=percentile_high)


def normalization_of(measures: Iterable[ImageMeasures], mode: str = DATASET, *, percentile_low: float = 1.0,
                     percentile_high: float = 99.8) -> Normalization:
    """``compute_normalization`` from the images' measures (taken under the same mode)."""
    if mode == IMAGENET:
        for _ in measures:  # consumed all the same: the caller may be checking tiles on the way
            pass
        return IMAGENET_NORMALIZATION
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for measured in measures:
        sums, squares = measured.moments_after(measured.scale, measured.offset)
        total += sums
        total_sq += squares
        count += measured.count
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
