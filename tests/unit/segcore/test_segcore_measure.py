"""segcore.measure: pixels, area fractions and objects (8-connected components) per class."""

from __future__ import annotations

import numpy as np

from segcore.measure import ClassMeasure, measure_mask


def test_objects_are_eight_connected_components_per_class() -> None:
    mask = np.zeros((6, 6), dtype=np.int64)
    mask[0, 0] = mask[1, 1] = 1  # touch at a corner: one object
    mask[4, 4] = mask[4, 5] = 1  # a second object of class 1
    mask[0, 5] = 2  # one pixel of class 2
    mask[5, 0] = 7  # not a class of the model: not counted
    measures = measure_mask(mask, 3)
    assert measures[1] == ClassMeasure(pixels=4, fraction=4 / 36, objects=2)
    assert measures[2] == ClassMeasure(pixels=1, fraction=1 / 36, objects=1)
    assert measures[0].pixels == 30 and measures[0].objects == 1  # the background around them is one region


def test_a_class_absent_from_the_tile_has_no_pixels_and_no_objects() -> None:
    measures = measure_mask(np.zeros((4, 4), dtype=np.int64), 2)
    assert measures == [ClassMeasure(16, 1.0, 1), ClassMeasure(0, 0.0, 0)]
