"""Overfitting, generalisation-gap, plateau and degenerate-model detection on crafted series."""

from __future__ import annotations

from dataclasses import dataclass

from segcore.advice import (
    CLASS_NOT_LEARNED,
    DEGENERATE,
    GENERALISATION_GAP,
    OVERFITTING,
    PLATEAU,
    PREDICTIONS_COLLAPSED,
    AdviceDetector,
    quality_issues,
)


@dataclass
class E:
    epoch: int
    train_loss: float
    val_loss: float
    train_iou: float
    val_iou: float


def feed(series: list[tuple[float, float, float, float]], detector: AdviceDetector | None = None
         ) -> dict[int, list[str]]:
    detector = detector or AdviceDetector()
    history: list[E] = []
    fired: dict[int, list[str]] = {}
    for i, values in enumerate(series, start=1):
        history.append(E(i, *values))
        kinds = [a.kind for a in detector.update(history)]
        if kinds:
            fired[i] = kinds
    return fired


def test_healthy_training_gives_no_advice() -> None:
    series = [(1 / i, 1.1 / i, 0.5 + 0.04 * i, 0.48 + 0.04 * i) for i in range(1, 11)]
    assert feed(series) == {}


def test_val_loss_rising_while_train_loss_falls_is_overfitting() -> None:
    series = [(1.0, 1.0, 0.5, 0.5), (0.8, 0.8, 0.6, 0.6), (0.6, 0.7, 0.7, 0.65),
              (0.5, 0.75, 0.75, 0.66), (0.4, 0.8, 0.8, 0.665), (0.3, 0.9, 0.85, 0.664)]
    fired = feed(series)
    assert OVERFITTING in fired[6] and all(OVERFITTING not in kinds for e, kinds in fired.items() if e < 6)


def test_advice_fires_once_per_episode_and_again_after_it_clears() -> None:
    rising = [(1.0 - 0.1 * i, 0.5 + 0.1 * i, 0.5, 0.5) for i in range(5)]  # overfits from epoch 4 on
    recovered = [(0.5, 0.2, 0.5, 0.5)]
    again = [(0.4, 0.3, 0.5, 0.5), (0.3, 0.4, 0.5, 0.5), (0.2, 0.5, 0.5, 0.5)]
    fired = feed(rising + recovered + again, AdviceDetector(plateau_window=100))
    assert [e for e, kinds in fired.items() if OVERFITTING in kinds] == [4, 9]


def test_widening_gap_between_train_and_val_iou() -> None:
    series = [(0.5, 0.5, 0.70, 0.68), (0.4, 0.45, 0.78, 0.70), (0.3, 0.44, 0.85, 0.71),
              (0.2, 0.43, 0.90, 0.71), (0.1, 0.42, 0.95, 0.72)]
    fired = feed(series)
    assert GENERALISATION_GAP in fired.get(4, []) or GENERALISATION_GAP in fired.get(5, [])
    # A small gap that widens is not yet worth advice.
    small = [(0.5, 0.5, 0.700, 0.700), (0.4, 0.4, 0.710, 0.705), (0.3, 0.3, 0.720, 0.709), (0.2, 0.2, 0.730, 0.712)]
    assert feed(small) == {}


def test_no_val_improvement_for_k_epochs_is_a_plateau() -> None:
    series = [(1 / i, 1 / i, 0.8, 0.5 + 0.05 * i) for i in range(1, 6)]  # improves to 0.75 at epoch 5
    series += [(0.1, 0.2, 0.8, 0.74)] * 5  # then stalls for 5 epochs
    fired = feed(series)
    assert fired == {10: [PLATEAU]}


@dataclass
class P:
    """An epoch with validation pixel counts, as segcore.training records them."""

    epoch: int
    per_class_iou: list[float | None]
    val_true_pixels: list[int]
    val_pred_pixels: list[int]
    train_loss: float = 0.5
    val_loss: float = 0.5
    train_iou: float = 0.4
    val_iou: float = 0.4


CLASSES = ["background", "nucleus", "debris"]


def test_predictions_collapsed_to_background_are_a_quality_issue_naming_the_class() -> None:
    collapsed = P(4, [0.85, 0.0, 0.0], [8500, 1200, 300], [10000, 0, 0])
    issues = quality_issues(collapsed, CLASSES)
    assert [(i.code, i.class_name) for i in issues] == [(PREDICTIONS_COLLAPSED, "background")]
    assert "15.0 % of the validation pixels belong to other classes" in issues[0].message
    assert "normalization" in issues[0].message and "learning rate" in issues[0].message


def test_a_present_class_with_iou_zero_is_not_learned_but_an_absent_one_is_fine() -> None:
    epoch = P(2, [0.9, 0.8, 0.0], [8000, 1500, 500], [8200, 1700, 100])
    assert [(i.code, i.class_name) for i in quality_issues(epoch, CLASSES)] == [(CLASS_NOT_LEARNED, "debris")]
    absent = P(2, [0.9, 0.8, None], [8500, 1500, 0], [8400, 1600, 0])
    assert quality_issues(absent, CLASSES) == []
    healthy = P(2, [0.95, 0.8, 0.6], [8000, 1500, 500], [8000, 1500, 500])
    assert quality_issues(healthy, CLASSES) == []


def test_an_all_background_validation_split_is_not_called_collapsed() -> None:
    assert quality_issues(P(1, [1.0, None, None], [10000, 0, 0], [10000, 0, 0]), CLASSES) == []


def test_degenerate_advice_fires_once_after_three_epochs_and_clears_on_recovery() -> None:
    detector = AdviceDetector(class_names=CLASSES)
    bad = [P(i, [0.85, 0.0, 0.0], [8500, 1200, 300], [10000, 0, 0]) for i in range(1, 5)]
    good = P(5, [0.95, 0.8, 0.6], [8000, 1500, 500], [8000, 1500, 500])
    history: list[P] = []
    fired = {}
    for epoch in [*bad, good]:
        history.append(epoch)
        fired[epoch.epoch] = [a for a in detector.update(history) if a.kind == DEGENERATE]
    assert [e for e, found in fired.items() if found] == [3]
    assert "collapsed to 'background'" in fired[3][0].message and "3 epochs" in fired[3][0].message


def test_epochs_without_pixel_counts_never_look_degenerate() -> None:
    detector = AdviceDetector(class_names=CLASSES)
    history = [E(i, 1.0, 1.0, 0.3, 0.3) for i in range(1, 6)]
    assert all(a.kind != DEGENERATE for i in range(1, 6) for a in detector.update(history[:i]))
