"""Decoding of image tiles and label masks, and per-channel normalisation.

This module owns the pixel conventions of segcore:
* images decode to ``H x W x 3`` in their native type and units (uint8, uint16 for 12- and
  16-bit data, signed integers, float32 in any units): nothing is rescaled or clipped here, so
  no dynamic range is lost. Channels map to the model's three inputs as follows: grey is
  replicated; two channels (a 2-channel TIFF) fill inputs 1 and 2 and input 3 is zero; RGB as
  is; a fourth channel (alpha) is dropped; grey+alpha PNGs are grey; more than 4 channels are
  refused, naming the tile;
* masks are int64 ``H x W`` class indices, 255 meaning "unlabelled";
* the network sees ``segcore.intensity.standardized(image, norm)`` as a ``C x H x W`` tensor
  (see segcore.intensity for the normalization modes).

TIFF goes through tifffile (Pillow's TIFF support misses many scientific
layouts); PNG/JPEG and everything else through Pillow. Any decode failure is an
``InvalidTileError`` naming the tile, so one bad upload can be reported
precisely instead of failing a whole job with a library traceback.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from segcore import limits
from segcore.errors import InvalidParameterError, InvalidTileError, TileTooLargeError
from segcore.intensity import IMAGENET_NORMALIZATION, Normalization, compute_normalization

__all__ = [
    "IMAGENET_NORMALIZATION", "Normalization", "compute_normalization", "decode_image", "decode_mask",
    "encode_mask_png", "image_size", "read_pixels",
]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic + BigTIFF
_PLANAR_CHANNELS = 8  # a first axis this short before a longer last one is channels (C x H x W)


# ------------------------------------------------------------------------- decoding


def _is_tiff(data: bytes, name: str) -> bool:
    return data[:4] in _TIFF_MAGIC or name.lower().endswith((".tif", ".tiff"))


def read_pixels(data: bytes, name: str, *, max_side: int,
                pil_array: Callable[[Image.Image], np.ndarray] | None = None) -> np.ndarray:
    """Raw pixel array (H x W or H x W x C) in the file's own dtype, after its header has shown
    that it fits `max_side` and the limits (segcore.limits): a small file that would decode into
    gigabytes is refused (TileTooLargeError) before a byte of it is decompressed. `pil_array`
    turns a decoded Pillow image into the array (default: as an image's pixels)."""
    to_array = pil_array or (lambda img: _pil_to_array(img, for_mask=False))
    if not data:
        raise InvalidTileError(name, "file is empty")
    if len(data) > limits.MAX_IMAGE_BYTES:
        raise TileTooLargeError(name, f"the file holds {len(data):,} bytes; at most {limits.MAX_IMAGE_BYTES:,}")
    with _decoding(name):
        if _is_tiff(data, name):
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                _check_header(name, tuple(series.shape), max_side)
                arr = np.asarray(series.asarray())
        else:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                _check_header(name, (height, width, len(img.getbands())), max_side)
                img.load()  # forces a full decode so truncated files fail here
                arr = to_array(img)
    if arr.size == 0:  # tifffile only logs a warning for a TIFF whose first page is missing
        raise InvalidTileError(name, "image has no pixels (corrupt or empty file)")
    return arr


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) as the file's header declares them, decoding no pixel."""
    if not data:
        raise InvalidTileError(name, "file is empty")
    with _decoding(name):
        if _is_tiff(data, name):
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                height, width = (*_channels_last(tuple(tif.series[0].shape)), 1, 1)[:2]
                return int(width), int(height)
        with Image.open(io.BytesIO(data)) as img:
            return img.size


@contextlib.contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turns whatever the decoders raise for a file into InvalidTileError naming the tile."""
    try:
        yield
    except InvalidTileError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at open: far over ours
        raise TileTooLargeError(name, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InvalidTileError(name, "not a recognised PNG, JPEG or TIFF image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncation as OSError, bad headers as SyntaxError/ValueError.
        raise InvalidTileError(name, f"cannot decode image: {exc}") from exc
    except Exception as exc:  # tifffile raises assorted types
        raise InvalidTileError(name, f"cannot decode image: {exc}") from exc


def _is_planar(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] <= _PLANAR_CHANNELS < shape[-1]


def _channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """H x W (x C) of an array shape, a planar one (C x H x W) included."""
    return (shape[1], shape[2], shape[0]) if _is_planar(shape) else shape


def _check_header(name: str, shape: tuple[int, ...], max_side: int) -> None:
    """Refuses, from the shape the header declares, an image with a side over `max_side` (or the
    limit), or more samples per pixel than any layout this module accepts."""
    shape = _channels_last(shape)
    height, width = (*shape, 1, 1)[:2]
    side = min(max_side, limits.MAX_TILE_SIDE)
    if max(height, width) > side:
        raise TileTooLargeError(name, f"{width}x{height} is larger than {side}x{side}")
    samples = int(np.prod(shape[2:], dtype=np.int64))
    if samples > limits.MAX_CHANNELS:
        raise InvalidTileError(name, f"has {samples} channels (shape {shape}); at most {limits.MAX_CHANNELS} are "
                                     "supported (grey, 2-channel, RGB, RGBA): select up to 3 channels before uploading")


def _pil_to_array(img: Image.Image, *, for_mask: bool) -> np.ndarray:
    if img.mode == "P":
        # A palette mask stores class indices as the palette positions; an image
        # wants the colours the palette maps to.
        return np.asarray(img) if for_mask else np.asarray(img.convert("RGBA"))
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8) * np.uint8(255)
    if img.mode in ("LA", "La", "PA") and not for_mask:
        return np.asarray(img.convert("L"))  # grey + alpha: the alpha is not a signal channel
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        # Pillow widens 16-bit PNGs to int32 "I"; values still fit 16 bits.
        arr = np.asarray(img)
        return arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr
    return np.asarray(img)


def decode_image(data: bytes, name: str, *, max_side: int = limits.MAX_TILE_SIDE) -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to ``H x W x 3`` in the file's own pixel type and units.

    Channels map as the module docstring says. Raises TileTooLargeError (an InvalidTileError)
    for an image over `max_side` or the limits, judged from its header before decoding, and
    InvalidTileError(name, reason) for corrupt data, NaN/infinite values or unsupported layouts.
    """
    arr = read_pixels(data, name, max_side=max_side)
    if _is_planar(arr.shape):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C x H x W)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InvalidTileError(name, f"expected a 2-D image, got array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidTileError(name, "image has zero size")
    arr = _three_channels(arr, name)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidTileError(name, "image contains NaN or infinite values")
        arr = arr.astype(np.float32, copy=False)
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise InvalidTileError(name, f"unsupported pixel type {arr.dtype}")
    return np.ascontiguousarray(arr)


def _three_channels(arr: np.ndarray, name: str) -> np.ndarray:
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:
        return np.concatenate([arr, np.zeros_like(arr[:, :, :1])], axis=2)
    if channels in (3, 4):
        return arr[:, :, :3]
    raise InvalidTileError(name, f"has {channels} channels; at most {limits.MAX_CHANNELS} are supported (grey, "
                                 "2-channel, RGB, RGBA): select up to 3 channels before uploading")


def decode_mask(data: bytes, name: str, *, max_side: int = limits.MAX_TILE_SIDE) -> np.ndarray:
    """Decode a PNG/TIFF label mask to int64 ``H x W`` class indices.

    Accepts 8/16-bit single-channel masks (palette PNGs give their indices) and
    RGB(A) masks whose three colour channels are equal. Raises InvalidTileError
    (TileTooLargeError over `max_side` or the limits, before decoding).
    """
    arr = read_pixels(data, name, max_side=max_side, pil_array=lambda img: _pil_to_array(img, for_mask=True))
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
