"""Training configuration and its validation.

This module owns ``TrainConfig``: every knob of a training run, with
``validate()`` turning bad values into ``InvalidParameterError(field, reason)``
so a service can report exactly which request field is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from segcore import hyperparameters
from segcore.architectures import architecture_names
from segcore.errors import InvalidParameterError, UnknownArchitectureError
from segcore.metrics import IGNORE_INDEX

_D = hyperparameters.DEFAULTS


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run (besides the data).

    The training parameters and their defaults come from ``segcore.hyperparameters`` (the one
    contract the services validate with too); ``class_names``, ``device``, ``num_threads``,
    ``data_workers`` and ``prepared_cache_mb`` are not job parameters but facts of the data and of the machine (none of
    them changes the results on a given device).
    """

    class_names: list[str]  # index 0 is background
    architecture: str = _D["architecture"]
    batch_size: int = _D["batch_size"]
    epochs: int = _D["epochs"]
    learning_rate: float = _D["learning_rate"]
    weight_decay: float = _D["weight_decay"]
    warmup_fraction: float = _D["warmup_fraction"]
    lr_schedule: str = _D["lr_schedule"]
    seed: int = _D["seed"]
    crop_size: int | None = _D["crop_size"]
    augment: bool = _D["augment"]
    loss: str = _D["loss"]
    class_weights: bool = _D["class_weights"]
    early_stopping_patience: int | None = _D["early_stopping_patience"]
    checkpoint_every: int = _D["checkpoint_every"]
    normalization: str = _D["normalization"]
    percentile_low: float = _D["percentile_low"]
    percentile_high: float = _D["percentile_high"]
    device: str | None = None  # None: cuda if available, else cpu
    num_threads: int | None = None  # CPU threads during training; None: leave as is
    data_workers: int = 0  # processes that load and prepare tiles (0: the training process itself)
    prepared_cache_mb: int = 256  # prepared tiles kept between epochs (a set that fits is prepared once)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def parameters(self) -> dict[str, object]:
        """The contract's parameters as set on this config."""
        return {p.name: getattr(self, p.name) for p in hyperparameters.PARAMETERS}

    def validate(self) -> None:
        """Raise InvalidParameterError (or UnknownArchitectureError) for bad values."""
        if self.architecture not in architecture_names():
            raise UnknownArchitectureError(self.architecture, architecture_names())
        _check_class_names(self.class_names)
        for name, reason in hyperparameters.violations(self.parameters(), architecture_names()):
            raise InvalidParameterError(name, reason)
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or isinstance(self.num_threads, bool) or self.num_threads < 1
        ):
            raise InvalidParameterError("num_threads", f"must be an integer >= 1, got {self.num_threads!r}")
        if not isinstance(self.data_workers, int) or isinstance(self.data_workers, bool) or self.data_workers < 0:
            raise InvalidParameterError("data_workers", f"must be an integer >= 0, got {self.data_workers!r}")
        if not isinstance(self.prepared_cache_mb, int) or self.prepared_cache_mb < 0:
            raise InvalidParameterError("prepared_cache_mb", f"must be an integer >= 0, got {self.prepared_cache_mb!r}")
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
