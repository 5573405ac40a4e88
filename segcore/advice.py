"""Overfitting and plateau detection on a job's epoch series, with advice in plain language.

The seed product told users to watch for these by hand; this module watches for them. It is pure
(any objects with epoch/train_loss/val_loss/train_iou/val_iou attributes) and stateful only to
avoid repeating itself: each kind of advice fires once per episode and may fire again after the
condition has cleared.

It also owns what makes a model *degenerate* (``quality_issues``): validation predictions that
collapsed to one class, or a class present in the validation ground truth whose IoU stays 0. A job
that trains to its end with such a model is not a plain success: the advice fires while it
trains, and the registered model carries the issues as quality warnings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

OVERFITTING = "overfitting"
GENERALISATION_GAP = "generalisation_gap"
PLATEAU = "plateau"
DEGENERATE = "degenerate"

PREDICTIONS_COLLAPSED = "PREDICTIONS_COLLAPSED"
CLASS_NOT_LEARNED = "CLASS_NOT_LEARNED"
_COLLAPSED_SHARE = 0.999  # one class holds this share of the predicted pixels ...
_OTHERS_SHARE = 0.01  # ... while the other classes hold at least this share of the true ones
_PRESENT_SHARE = 0.001  # a class counts as present with this share of the labelled pixels
_NOT_LEARNED_IOU = 0.01
_WHAT_TO_CHECK = ("Check the intensity normalization (the job's `normalization`; `percentile` suits dim or "
                  "high-bit-depth data), the class balance (`class_weights`, loss `ce+dice`) and the learning "
                  "rate (too high collapses training, too low learns nothing in the epochs given).")


class EpochLike(Protocol):
    @property
    def epoch(self) -> int: ...
    @property
    def train_loss(self) -> float: ...
    @property
    def val_loss(self) -> float: ...
    @property
    def train_iou(self) -> float: ...
    @property
    def val_iou(self) -> float: ...


@dataclass(frozen=True)
class Advice:
    kind: str
    epoch: int
    message: str


@dataclass(frozen=True)
class QualityIssue:
    code: str  # PREDICTIONS_COLLAPSED or CLASS_NOT_LEARNED
    class_name: str
    finding: str  # what was seen

    @property
    def message(self) -> str:
        """The finding and what to check."""
        return f"{self.finding} {_WHAT_TO_CHECK}"


@runtime_checkable
class EpochWithPixels(EpochLike, Protocol):
    @property
    def per_class_iou(self) -> list[float | None]: ...
    @property
    def val_true_pixels(self) -> list[int]: ...
    @property
    def val_pred_pixels(self) -> list[int]: ...


def quality_issues(result: EpochWithPixels, class_names: Sequence[str]) -> list[QualityIssue]:
    """What makes the model of this epoch degenerate on the validation split (empty when nothing
    does, or when the epoch carries no pixel counts)."""
    truth, pred = result.val_true_pixels, result.val_pred_pixels
    total_true, total_pred = sum(truth), sum(pred)
    if not total_true or not total_pred or len(truth) != len(class_names):
        return []
    top = max(range(len(pred)), key=lambda c: pred[c])
    if pred[top] >= _COLLAPSED_SHARE * total_pred and 1 - truth[top] / total_true >= _OTHERS_SHARE:
        return [QualityIssue(PREDICTIONS_COLLAPSED, class_names[top], (
            f"Validation predictions collapsed to '{class_names[top]}' ({100 * pred[top] / total_pred:.1f} % of "
            f"pixels) although {100 * (1 - truth[top] / total_true):.1f} % of the validation pixels belong to "
            f"other classes (epoch {result.epoch})."))]
    issues = []
    for c in range(1, len(class_names)):
        iou = result.per_class_iou[c] if c < len(result.per_class_iou) else None
        if truth[c] >= _PRESENT_SHARE * total_true and (iou or 0.0) < _NOT_LEARNED_IOU:
            issues.append(QualityIssue(CLASS_NOT_LEARNED, class_names[c], (
                f"Class '{class_names[c]}' covers {100 * truth[c] / total_true:.1f} % of the validation pixels "
                f"but its IoU is {iou or 0.0:.3f} (epoch {result.epoch}): the model does not find it.")))
    return issues


@dataclass
class AdviceDetector:
    """Rules, each over the last `window` epochs (`plateau_window` for the plateau):

    * overfitting: validation loss rose at every step while training loss fell overall;
    * generalisation gap: train IoU minus val IoU grew at every step and exceeds `min_gap`;
    * plateau: the best validation IoU has not improved by more than `min_delta` for
      `plateau_window` epochs;
    * degenerate: every one of the last `window` epochs has a quality issue (``quality_issues``;
      needs `class_names` and epochs with pixel counts).
    """

    class_names: Sequence[str] = ()
    window: int = 3
    plateau_window: int = 5
    min_delta: float = 1e-3
    min_gap: float = 0.05
    _active: set[str] = field(default_factory=set)

    def update(self, history: Sequence[EpochLike]) -> list[Advice]:
        """Advice that starts at the last epoch of `history` (an epoch-ordered series)."""
        found = {
            OVERFITTING: self._overfitting(history),
            GENERALISATION_GAP: self._gap(history),
            PLATEAU: self._plateau(history),
            DEGENERATE: self._degenerate(history),
        }
        fresh = [advice for kind, advice in found.items() if advice is not None and kind not in self._active]
        self._active = {kind for kind, advice in found.items() if advice is not None}
        return fresh

    def _overfitting(self, h: Sequence[EpochLike]) -> Advice | None:
        recent = h[-(self.window + 1):]
        if len(recent) <= self.window:
            return None
        val_rising = all(b.val_loss > a.val_loss + self.min_delta for a, b in itertools.pairwise(recent))
        train_falling = recent[-1].train_loss < recent[0].train_loss - self.min_delta
        if not (val_rising and train_falling):
            return None
        return Advice(OVERFITTING, recent[-1].epoch, (
            f"Validation loss has risen for {self.window} epochs ({recent[0].val_loss:.4f} -> "
            f"{recent[-1].val_loss:.4f}) while training loss keeps falling: the model is starting to "
            "memorise the training tiles. Consider stopping (the best model so far is kept), adding "
            "annotated tiles, or enabling augmentation."))

    def _gap(self, h: Sequence[EpochLike]) -> Advice | None:
        recent = h[-(self.window + 1):]
        if len(recent) <= self.window:
            return None
        gaps = [e.train_iou - e.val_iou for e in recent]
        widening = all(b > a + self.min_delta for a, b in itertools.pairwise(gaps))
        if not (widening and gaps[-1] > self.min_gap):
            return None
        last = recent[-1]
        return Advice(GENERALISATION_GAP, last.epoch, (
            f"The gap between training IoU ({last.train_iou:.3f}) and validation IoU ({last.val_iou:.3f}) "
            f"has widened for {self.window} epochs. More varied training tiles, stronger augmentation or "
            "more weight decay usually help."))

    def _degenerate(self, h: Sequence[EpochLike]) -> Advice | None:
        recent = h[-self.window:]
        if not self.class_names or len(recent) < self.window:
            return None
        found = [quality_issues(e, self.class_names) for e in recent if isinstance(e, EpochWithPixels)]
        if len(found) < self.window or not all(found):
            return None
        findings = " ".join(issue.finding for issue in found[-1])
        return Advice(DEGENERATE, recent[-1].epoch,
                      f"{findings} This has held for {self.window} epochs. {_WHAT_TO_CHECK}")

    def _plateau(self, h: Sequence[EpochLike]) -> Advice | None:
        if len(h) <= self.plateau_window:
            return None
        best = max(h, key=lambda e: e.val_iou)
        before = max(e.val_iou for e in h[: -self.plateau_window])
        if best.val_iou > before + self.min_delta:
            return None
        return Advice(PLATEAU, h[-1].epoch, (
            f"Validation IoU has not improved for {self.plateau_window} epochs (best {best.val_iou:.3f} at "
            f"epoch {best.epoch}). More epochs are unlikely to help: consider early stopping, a lower "
            "learning rate, or more annotated tiles."))
