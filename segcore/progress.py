"""Progress reporting: per-epoch results and the observer protocol.

This module owns what leaves the training loop while it runs. Following
torchtune/Lightning callbacks, but deliberately tiny: four hooks, no access to
the model or optimiser, so an observer (a gRPC progress stream, a notebook
printer, a test spy) cannot change training except by asking it to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one completed epoch (``epoch`` is 1-based)."""

    epoch: int
    epochs: int
    train_loss: float
    train_iou: float
    val_loss: float
    val_iou: float
    per_class_iou: list[float | None]  # validation; None = class absent from val
    learning_rate: float  # LR of the epoch's last optimiser step
    seconds: float
    is_best: bool
    # Validation pixels per class in the ground truth and in the predictions (empty in states
    # saved before they were recorded); the degenerate-model checks read them.
    val_true_pixels: list[int] = field(default_factory=list)
    val_pred_pixels: list[int] = field(default_factory=list)

    def log_line(self) -> str:
        return (
            f"Epoch {self.epoch}/{self.epochs}: Train Loss {self.train_loss:.4f}, "
            f"Train IoU {self.train_iou:.4f}, Val Loss {self.val_loss:.4f}, Val IoU {self.val_iou:.4f}"
        )


@runtime_checkable
class TrainingObserver(Protocol):
    """Progress and cancellation hooks; ``batch`` and ``epoch`` are 1-based."""

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None: ...

    def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None: ...

    def on_epoch_end(self, result: EpochResult) -> None: ...

    def should_stop(self) -> bool:
        """Polled after every training and validation batch; True ends training
        before the next batch (the unfinished epoch is not recorded)."""
        ...


class NullObserver:
    """Does nothing; subclass it to implement only the hooks you need."""

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None:
        pass

    def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        pass

    def on_epoch_end(self, result: EpochResult) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class PrintObserver(NullObserver):
    """Prints one ``log_line`` per epoch (handy in notebooks)."""

    def on_epoch_end(self, result: EpochResult) -> None:
        print(result.log_line(), flush=True)
