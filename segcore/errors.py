"""Domain errors raised by segcore.

This module owns the exception hierarchy. Every error is a plain exception that
carries the offending field, tile or architecture name as an attribute, so a
service layer can map it to a transport status code (e.g. INVALID_ARGUMENT,
FAILED_PRECONDITION) without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence


class SegcoreError(Exception):
    """Base class of every error segcore raises on purpose."""


class UnknownArchitectureError(SegcoreError, KeyError):
    """An architecture name that is not in the registry.

    Subclasses KeyError too because it *is* a failed registry lookup; callers
    that already catch KeyError keep working.
    """

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        super().__init__(name)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the key; we want a readable sentence.
        return f"unknown architecture {self.name!r}; valid names: {', '.join(self.valid)}"


class InvalidTileError(SegcoreError, ValueError):
    """A tile (image or mask) that cannot be decoded or does not fit the task."""

    def __init__(self, tile: str, reason: str) -> None:
        self.tile = tile
        self.reason = reason
        super().__init__(f"tile {tile!r}: {reason}")


class TileTooLargeError(InvalidTileError):
    """A tile over a size limit (segcore.limits), found before the work it would cost was done."""


class InvalidParameterError(SegcoreError, ValueError):
    """A configuration or call parameter with an unusable value."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class IncompatibleModelError(SegcoreError, ValueError):
    """Model bytes, a checkpoint or pretrained weights that do not fit the request."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TrainingDivergedError(SegcoreError, ArithmeticError):
    """The training loss became NaN or infinite (usually: learning rate too high)."""

    def __init__(self, epoch: int, batch: int, loss: float) -> None:
        self.epoch = epoch
        self.batch = batch
        self.loss = loss
        super().__init__(
            f"training diverged: loss is {loss} at epoch {epoch}, batch {batch}; try a lower learning_rate"
        )
