"""Label images as annotations: class-index masks and instance masks (PNG or TIFF).

This module owns the raster formats: ``masks`` (each pixel holds its class
index, 255 = unlabelled) and ``instance-masks`` (each pixel holds an object id,
0 = background; every object becomes one chosen class). TIFF is read with
tifffile, everything else with Pillow; the pixel values are checked, never
rescaled or recoloured, because a mask saved with the wrong values must be
reported rather than silently trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from segcore import imaging
from segcore.annotations.issues import ERROR, UNLABELLED, Notes, Rendered, finish, short_list


def _pil_labels(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        return np.asarray(img)  # palette masks store labels as palette positions, not colours
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"))
    return np.asarray(img)  # L, LA, RGB(A), I;16 (uint16), I (int32: 16/32-bit PNG), F


def _read_image(data: bytes, tile: str, width: int, height: int, notes: Notes) -> np.ndarray | None:
    """Raw pixel array of a PNG/TIFF label image, in the file's own dtype; None (with a
    SIZE_MISMATCH error) when its header shows another size than the tile's, decoding nothing."""
    w, h = imaging.image_size(data, tile)
    if (w, h) != (width, height):
        notes.add(ERROR, "SIZE_MISMATCH", f"mask is {w}x{h} pixels but the image is {width}x{height}")
        return None
    return imaging.read_pixels(data, tile, max_side=max(width, height), pil_array=_pil_labels)


def _labels_2d(arr: np.ndarray, notes: Notes, *, any_colour: bool) -> np.ndarray | None:
    """One int64 label per pixel, or None (error noted) for a layout that is not a label image."""
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        arr = arr[:, :, 0]  # grey, or grey + alpha
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[:, :, :3]
        if any_colour:
            arr = np.asarray(rgb.any(axis=2))  # colour-coded instances: any non-black pixel is an object
        elif (rgb == rgb[:, :, :1]).all():
            arr = rgb[:, :, 0]
        else:
            notes.add(
                ERROR,
                "BAD_FORMAT",
                "mask has colour channels with different values; expected class indices (a grey or palette image)",
            )
            return None
    if arr.ndim != 2:
        notes.add(ERROR, "BAD_FORMAT", f"expected a 2-D label image, got an array of shape {arr.shape}")
        return None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        notes.add(ERROR, "BAD_FORMAT", f"unsupported pixel type {arr.dtype}")
        return None
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        notes.add(ERROR, "BAD_FORMAT", "mask has fractional or NaN values; expected integer labels")
        return None
    return arr.astype(np.int64)


def _size_matches(labels: np.ndarray, width: int, height: int, notes: Notes) -> bool:
    if labels.shape == (height, width):
        return True
    h, w = labels.shape
    notes.add(ERROR, "SIZE_MISMATCH", f"mask is {w}x{h} pixels but the image is {width}x{height}")
    return False


def render_class_mask(data: bytes, tile: str, width: int, height: int, n_classes: int) -> Rendered:
    """A class-index mask file as the tile's mask; values that are no class become 255 (with an error)."""
    notes = Notes(tile)
    raw = _read_image(data, tile, width, height, notes)
    labels = None if raw is None else _labels_2d(raw, notes, any_colour=False)
    if labels is None or not _size_matches(labels, width, height, notes):
        return Rendered(np.full((height, width), UNLABELLED, np.uint8), notes.issues())
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != UNLABELLED)
    if bad.any():
        values = short_list([str(v) for v in np.unique(labels[bad]).tolist()])
        notes.add(
            ERROR,
            "BAD_CLASS_INDEX",
            f"mask values {values} are not class indices (0..{n_classes - 1}) or 255 (unlabelled)",
        )
        labels = np.where(bad, UNLABELLED, labels)
    return finish(labels.astype(np.uint8), notes)


def render_instance_mask(data: bytes, tile: str, width: int, height: int, instance_class: int) -> Rendered:
    """An instance-label file as the tile's mask: every object in ``instance_class``, the rest background."""
    notes = Notes(tile)
    raw = _read_image(data, tile, width, height, notes)
    labels = None if raw is None else _labels_2d(raw, notes, any_colour=True)
    if labels is None or not _size_matches(labels, width, height, notes):
        return Rendered(np.full((height, width), UNLABELLED, np.uint8), notes.issues())
    # Instance ids only tell objects apart; semantic training needs "object or not".
    return finish(np.where(labels != 0, instance_class, 0).astype(np.uint8), notes)
