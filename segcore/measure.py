"""What an analysis reports about a predicted class-index mask: per class, its pixels, their
fraction of the tile, and its objects (connected components, 8-connected: pixels that touch at
an edge or a corner belong to one object, as annotators draw them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ClassMeasure:
    pixels: int
    fraction: float
    objects: int


def measure_mask(mask: np.ndarray, num_classes: int) -> list[ClassMeasure]:
    """One measure per class index ``0..num_classes-1`` of an ``H x W`` mask (other values are
    not counted). Cost: one pass for the counts, one labelling per class present."""
    flat = np.asarray(mask).reshape(-1)
    valid = flat[(flat >= 0) & (flat < num_classes)].astype(np.int64)
    counts = np.bincount(valid, minlength=num_classes)[:num_classes]
    total = max(1, flat.size)
    measures = []
    for index, pixels in enumerate(counts):
        objects = 0
        if pixels:
            _, objects = ndimage.label(mask == index, structure=_EIGHT_CONNECTED)
        measures.append(ClassMeasure(int(pixels), float(pixels) / total, int(objects)))
    return measures
