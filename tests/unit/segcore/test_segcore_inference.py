"""Whole-image prediction with a sliding window, and pixel counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segcore_testutil import make_discs

from segcore.architectures import build_model
from segcore.errors import InvalidParameterError
from segcore.imaging import Normalization
from segcore.inference import class_pixel_counts, predict_mask, predict_masks, window_starts
from segcore.metrics import ConfusionMatrix
from segcore.training import Sample, TrainConfig, TrainResult

Trained = tuple[TrainConfig, TrainResult, list[Sample]]
NORM = Normalization(mean=(0.3, 0.3, 0.3), std=(0.3, 0.3, 0.3))


def test_window_starts_cover_and_end_flush() -> None:
    assert window_starts(100, 64, 16) == [0, 36]
    assert window_starts(64, 64, 16) == [0]
    assert window_starts(30, 64, 16) == [0]
    assert window_starts(200, 64, 0) == [0, 64, 128, 136]


@pytest.mark.parametrize("shape", [(100, 75), (64, 200), (20, 25)])
def test_sliding_window_returns_full_resolution(shape: tuple[int, int]) -> None:
    model = build_model("upernet-convnext-cpu", 3)
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    mask = predict_mask(model, image, NORM, tile_size=64, overlap=16)
    assert mask.shape == shape and mask.dtype == np.int64
    assert mask.min() >= 0 and mask.max() < 3


def test_large_tile_size_equals_single_pass() -> None:
    torch.manual_seed(0)
    model = build_model("upernet-convnext-cpu", 2)
    image = np.random.default_rng(1).random((48, 40, 3), dtype=np.float32)
    whole = predict_mask(model, image, NORM)
    np.testing.assert_array_equal(predict_mask(model, image, NORM, tile_size=64), whole)


def test_trained_model_segments_a_larger_image(trained_discs: Trained) -> None:
    _, result, _ = trained_discs
    model = build_model("upernet-convnext-cpu", 2)
    assert result.best_state is not None
    model.load_state_dict(result.best_state)
    big = make_discs(1, 144, seed=9)[0]  # three times the training tile size
    mask = predict_mask(model, big.image, result.normalization, tile_size=48, overlap=16)
    cm = ConfusionMatrix(2)
    cm.update(torch.from_numpy(mask), torch.from_numpy(big.mask))
    assert cm.mean_iou() > 0.6


def test_bad_window_parameters() -> None:
    model = build_model("upernet-convnext-cpu", 2)
    image = np.zeros((40, 40, 3), np.float32)
    with pytest.raises(InvalidParameterError) as overlap:
        predict_mask(model, image, NORM, tile_size=64, overlap=64)
    assert overlap.value.field == "overlap"
    with pytest.raises(InvalidParameterError) as tile:
        predict_mask(model, image, NORM, tile_size=16)
    assert tile.value.field == "tile_size"
    with pytest.raises(InvalidParameterError):
        predict_mask(model, np.zeros((40, 40), np.float32), NORM)


def test_class_pixel_counts() -> None:
    mask = np.array([[0, 0, 1], [2, 255, 1]])
    assert class_pixel_counts(mask, 3) == [2, 2, 1]
    assert class_pixel_counts(mask, 5) == [2, 2, 1, 0, 0]


def test_predict_masks_batches_tiles_and_matches_one_by_one() -> None:
    torch.manual_seed(0)
    model = build_model("upernet-convnext-cpu", 3).eval()
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(5)]
    images.insert(2, rng.random((96, 80, 3), dtype=np.float32))  # larger than the tile: sliding window
    images.append(rng.random((48, 48, 3), dtype=np.float32))  # another shape
    batched = predict_masks(model, images, norm, tile_size=64, batch_size=4)
    single = [predict_mask(model, image, norm, tile_size=64) for image in images]
    assert [m.shape for m in batched] == [image.shape[:2] for image in images]
    for a, b in zip(batched, single, strict=True):
        assert (a == b).mean() > 0.999  # the same up to float ties between batch compositions
