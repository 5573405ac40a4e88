"""Confusion-matrix metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from segcore.metrics import ConfusionMatrix

# target 0 0 1 1 2 2 / pred 0 1 1 1 0 2 gives, rows = truth, columns = prediction:
#   [[1, 1, 0],
#    [0, 2, 0],
#    [1, 0, 1]]
# IoU0 = 1 / (1 + 1 + 1) = 1/3, IoU1 = 2 / (2 + 1 + 0) = 2/3, IoU2 = 1 / (1 + 0 + 1) = 1/2
TARGET = torch.tensor([[0, 0, 1], [1, 2, 2]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def test_matrix_and_metrics_match_hand_computation() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.iou_per_class() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert cm.mean_iou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # background included
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_absent_class_is_none_and_excluded_from_mean() -> None:
    cm = ConfusionMatrix(4)  # class 3: no target and no predicted pixels
    cm.update(PRED, TARGET)
    ious = cm.iou_per_class()
    assert ious[3] is None
    assert cm.mean_iou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_predicted_but_absent_class_counts_as_zero() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 0, 0]), torch.tensor([0, 0, 0, 0]))  # class 2 only predicted
    assert cm.iou_per_class() == [pytest.approx(3 / 4), None, 0.0]
    assert cm.mean_iou() == pytest.approx(3 / 8)


def test_ignore_index_is_skipped() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1, 0]), torch.tensor([1, 255, 0]))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.pixel_accuracy() == 1.0


def test_epoch_iou_is_not_the_mean_of_batch_ious() -> None:
    cm = ConfusionMatrix(2)
    batch_ious = []
    batches = [
        (torch.tensor([1, 0, 0, 0]), torch.tensor([1, 0, 0, 0])),  # perfect
        (torch.tensor([0] * 12 + [1] * 4), torch.tensor([0] * 8 + [1] * 8)),  # half of class 1 missed
    ]
    for pred, target in batches:
        single = ConfusionMatrix(2)
        single.update(pred, target)
        batch_ious.append(single.mean_iou())
        cm.update(pred, target)
    whole = ConfusionMatrix(2)
    whole.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert cm.matrix.tolist() == whole.matrix.tolist()
    assert cm.mean_iou() == pytest.approx(whole.mean_iou())
    assert cm.mean_iou() != pytest.approx(sum(batch_ious) / 2)
    # class 0: tp 11, fp 4, fn 0 -> 11/15; class 1: tp 5, fp 0, fn 4 -> 5/9
    assert cm.iou_per_class() == pytest.approx([11 / 15, 5 / 9])


def test_empty_matrix_and_bad_input() -> None:
    cm = ConfusionMatrix(2)
    assert cm.iou_per_class() == [None, None]
    assert cm.mean_iou() == 0.0 and cm.pixel_accuracy() == 0.0
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    cm.update(torch.tensor([0]), torch.tensor([0]))
    cm.reset()
    assert cm.matrix.sum() == 0
