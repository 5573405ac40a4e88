"""Training configuration and its validation.

This module owns ``TrainConfig``: every knob of a training run, with
``validate()`` turning bad values into ``InvalidParameterError(field, reason)``
so a service can report exactly which request field is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from segcore.architectures import DEFAULT_ARCHITECTURE, architecture_names
from segcore.data import MIN_INPUT_SIZE
from segcore.errors import InvalidParameterError, UnknownArchitectureError
from segcore.losses import LOSSES
from segcore.metrics import IGNORE_INDEX


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run (besides the data)."""

    class_names: list[str]  # index 0 is background
    architecture: str = DEFAULT_ARCHITECTURE
    batch_size: int = 8
    epochs: int = 10
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # share of all steps spent on linear LR warm-up
    seed: int = 0
    crop_size: int | None = None  # random square crops for training; None = whole tiles
    augment: bool = True  # flips, 90-degree rotations, mild intensity jitter
    loss: str = "ce"  # "ce" | "dice" | "ce+dice"
    class_weights: bool = False  # inverse-sqrt-frequency weights in the CE term
    early_stopping_patience: int | None = None  # epochs without val mIoU gain
    checkpoint_every: int = 1  # epochs between checkpoint callbacks
    device: str | None = None  # None: cuda if available, else cpu
    num_threads: int | None = None  # CPU threads during training; None: leave as is

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def validate(self) -> None:
        """Raise InvalidParameterError (or UnknownArchitectureError) for bad values."""
        if self.architecture not in architecture_names():
            raise UnknownArchitectureError(self.architecture, architecture_names())
        _check_class_names(self.class_names)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("seed", self.seed, 0, "must be in [0, 2**32)", upper=2**32 - 1)
        if self.crop_size is not None:
            _check_int(
                "crop_size", self.crop_size, MIN_INPUT_SIZE, "must be at least 32 pixels (network stride)"
            )
        for name in ("early_stopping_patience", "num_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_float("learning_rate", self.learning_rate, positive=True)
        _check_float("weight_decay", self.weight_decay, positive=False)
        _check_float("warmup_fraction", self.warmup_fraction, positive=False)
        if self.warmup_fraction >= 1:
            raise InvalidParameterError("warmup_fraction", "must be in [0, 1)")
        if self.loss not in LOSSES:
            raise InvalidParameterError("loss", f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        for name in ("augment", "class_weights"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"must be a bool, got {getattr(self, name)!r}")
        resolve_device(self.device)


def _check_class_names(names: Sequence[str]) -> None:
    if not isinstance(names, (list, tuple)) or len(names) < 2:
        raise InvalidParameterError("class_names", "need at least 2 classes (background + one)")
    if len(names) > IGNORE_INDEX:
        raise InvalidParameterError(
            "class_names", f"at most {IGNORE_INDEX} classes ({IGNORE_INDEX} marks unlabelled pixels)"
        )
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise InvalidParameterError("class_names", "names must be non-empty strings")
    if len(set(names)) != len(names):
        raise InvalidParameterError("class_names", "names must be unique")


def _check_int(
    name: str, value: object, lower: int, reason: str | None = None, upper: int | None = None
) -> None:
    # bool is an int subclass; True as a batch size is a caller bug, not 1.
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lower
    if ok and upper is not None:
        ok = value <= upper  # type: ignore[operator]
    if not ok:
        raise InvalidParameterError(name, (reason or f"must be an integer >= {lower}") + f", got {value!r}")


def _check_float(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > 0 if positive else value >= 0  # type: ignore[operator]
    if not ok:
        kind = "a finite number > 0" if positive else "a finite number >= 0"
        raise InvalidParameterError(name, f"must be {kind}, got {value!r}")


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> cuda if available else cpu; raises InvalidParameterError if unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidParameterError("device", f"not a torch device: {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device", "CUDA was requested but is not available")
    return resolved
