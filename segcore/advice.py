"""Overfitting and plateau detection on a job's epoch series, with advice in plain language.

The seed product told users to watch for these by hand; this module watches for them. It is pure
(any objects with epoch/train_loss/val_loss/train_iou/val_iou attributes) and stateful only to
avoid repeating itself: each kind of advice fires once per episode and may fire again after the
condition has cleared.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

OVERFITTING = "overfitting"
GENERALISATION_GAP = "generalisation_gap"
PLATEAU = "plateau"


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


@dataclass
class AdviceDetector:
    """Rules, each over the last `window` epochs (`plateau_window` for the plateau):

    * overfitting: validation loss rose at every step while training loss fell overall;
    * generalisation gap: train IoU minus val IoU grew at every step and exceeds `min_gap`;
    * plateau: the best validation IoU has not improved by more than `min_delta` for
      `plateau_window` epochs.
    """

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
