"""Decoding of image tiles and label masks, and per-channel normalisation.

This module owns the pixel conventions of segcore:
* images are float32 ``H x W x 3`` in [0, 1] (integers are divided by their
  dtype's maximum, so 8- and 16-bit sources land on the same scale);
* masks are int64 ``H x W`` class indices, 255 meaning "unlabelled";
* the network sees ``(image - mean) / std`` per channel, as a ``C x H x W`` tensor.

TIFF goes through tifffile (Pillow's TIFF support misses many scientific
layouts); PNG/JPEG and everything else through Pillow. Any decode failure is an
``InvalidTileError`` naming the tile, so one bad upload can be reported
precisely instead of failing a whole job with a library traceback.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from segcore.errors import InvalidParameterError, InvalidTileError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic + BigTIFF
# Keeps a constant channel (e.g. an all-black band) from dividing by zero.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation, in [0, 1] pixel units."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Iterable[float]]) -> Normalization:
        mean = tuple(float(v) for v in data["mean"])
        std = tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise InvalidParameterError("normalization", "mean and std need 3 values each")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise InvalidParameterError("normalization", f"std must be positive, got {std}")
        return cls(mean=mean, std=std)  # type: ignore[arg-type]


# Statistics of the ImageNet training set; use them with ImageNet-pretrained backbones.
IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


# ------------------------------------------------------------------------- decoding


def _is_tiff(data: bytes, name: str) -> bool:
    return data[:4] in _TIFF_MAGIC or name.lower().endswith((".tif", ".tiff"))


def _read_array(data: bytes, name: str, *, for_mask: bool) -> np.ndarray:
    """Raw pixel array (H x W or H x W x C) in the file's own dtype."""
    if not data:
        raise InvalidTileError(name, "file is empty")
    try:
        if _is_tiff(data, name):
            return np.asarray(tifffile.imread(io.BytesIO(data)))
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode so truncated files fail here
            return _pil_to_array(img, for_mask=for_mask)
    except InvalidTileError:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidTileError(name, "not a recognised PNG, JPEG or TIFF image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncation as OSError, bad headers as SyntaxError/ValueError.
        raise InvalidTileError(name, f"cannot decode image: {exc}") from exc
    except Exception as exc:  # tifffile raises assorted types
        raise InvalidTileError(name, f"cannot decode image: {exc}") from exc


def _pil_to_array(img: Image.Image, *, for_mask: bool) -> np.ndarray:
    if img.mode == "P":
        # A palette mask stores class indices as the palette positions; an image
        # wants the colours the palette maps to.
        return np.asarray(img) if for_mask else np.asarray(img.convert("RGBA"))
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        # Pillow widens 16-bit PNGs to int32 "I"; values still fit 16 bits.
        arr = np.asarray(img)
        return arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr
    return np.asarray(img)


def _to_unit_float(arr: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.bool_):
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min < 0:
            # Signed data has no natural [0, 1] mapping; shift the full range.
            return ((arr.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
        return (arr.astype(np.float64) / info.max).astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise InvalidTileError(name, "image contains NaN or infinite values")
        # Float data is assumed to be in [0, 1] already; clip small excursions.
        return np.clip(out, 0.0, 1.0)
    raise InvalidTileError(name, f"unsupported pixel type {arr.dtype}")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to float32 ``H x W x 3`` in [0, 1].

    Grayscale is replicated to three channels, alpha is dropped. Raises
    InvalidTileError(name, reason) for corrupt data or unsupported layouts.
    """
    arr = _read_array(data, name, for_mask=False)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C x H x W)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InvalidTileError(name, f"expected a 2-D image, got array of shape {arr.shape}")
    channels = arr.shape[2]
    if channels in (1, 2):  # gray or gray+alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif channels in (3, 4):
        arr = arr[:, :, :3]
    else:
        raise InvalidTileError(name, f"expected 1, 3 or 4 channels, got {channels}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidTileError(name, "image has zero size")
    return np.ascontiguousarray(_to_unit_float(arr, name))


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode a PNG/TIFF label mask to int64 ``H x W`` class indices.

    Accepts 8/16-bit single-channel masks (palette PNGs give their indices) and
    RGB(A) masks whose three colour channels are equal. Raises InvalidTileError.
    """
    arr = _read_array(data, name, for_mask=True)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[:, :, 0]
        elif arr.shape[2] in (3, 4):
            rgb = arr[:, :, :3]
            if not (
                np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
            ):
                raise InvalidTileError(
                    name, "mask has colour channels with different values; expected class indices"
                )
            arr = rgb[:, :, 0]
        else:
            raise InvalidTileError(name, f"mask has {arr.shape[2]} channels; expected 1")
    if arr.ndim != 2:
        raise InvalidTileError(name, f"expected a 2-D mask, got array of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.array_equal(arr, np.round(arr)):
            raise InvalidTileError(name, "mask has fractional values; expected class indices")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise InvalidTileError(name, f"unsupported mask pixel type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InvalidTileError(name, "mask has negative values")
    return np.ascontiguousarray(arr.astype(np.int64))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode class indices as a PNG: 8-bit when all values are < 256, else 16-bit."""
    if mask.ndim != 2:
        raise InvalidParameterError("mask", f"expected H x W, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise InvalidParameterError("mask", "values must be in [0, 65535] to fit a PNG")
    if mask.size == 0 or mask.max() < 256:
        img = Image.fromarray(mask.astype(np.uint8))  # 2-D uint8 -> mode L
    else:
        img = Image.fromarray(mask.astype(np.uint16))  # Pillow picks mode I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------- normalisation


def compute_normalization(images: Iterable[np.ndarray]) -> Normalization:
    """Per-channel mean/std over all pixels of ``images`` (float H x W x 3)."""
    # Running float64 sums keep memory flat and stay exact enough for millions of pixels.
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for image in images:
        flat = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        total += flat.sum(axis=0)
        total_sq += np.square(flat).sum(axis=0)
        count += flat.shape[0]
    if count == 0:
        raise InvalidParameterError("images", "need at least one image to compute normalization")
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.maximum(np.sqrt(var), _MIN_STD)
    return Normalization(
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
    )


def normalize(image: np.ndarray, norm: Normalization) -> torch.Tensor:
    """``(image - mean) / std`` as a float32 ``C x H x W`` tensor."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidParameterError("image", f"expected H x W x 3, got shape {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
    return ((tensor - mean) / std).contiguous()
