"""The training-parameter contract (segcore.hyperparameters) on the wire: the proto
``Hyperparameters`` message to and from plain values, and validation as field violations.
Both the pipeline service (CreateJob) and the trainer node (RunJob) go through here."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from segtrain.common.v1 import common_pb2

from segcore import hyperparameters as contract
from services.common.errors import FieldViolation


def values_of(message: common_pb2.Hyperparameters) -> dict[str, object]:
    """The fields set on ``message``, by contract name."""
    return {field.name: value for field, value in message.ListFields()}


def message_of(values: Mapping[str, object]) -> common_pb2.Hyperparameters:
    """A message with every value that is not None (unset optional parameters stay unset)."""
    return common_pb2.Hyperparameters(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


def product_defaults() -> common_pb2.Hyperparameters:
    """The contract's defaults as a message (optional parameters unset)."""
    return message_of(contract.DEFAULTS)


def merged(*layers: common_pb2.Hyperparameters) -> common_pb2.Hyperparameters:
    """Each layer's set fields over the previous layers'."""
    result = common_pb2.Hyperparameters()
    for layer in layers:
        for field, value in layer.ListFields():
            setattr(result, field.name, value)
    return result


def violations(message: common_pb2.Hyperparameters, architectures: Collection[str] | None, *, prefix: str
               ) -> list[FieldViolation]:
    """Every set field the contract refuses, named ``{prefix}.{field}``."""
    return [FieldViolation(f"{prefix}.{name}", reason)
            for name, reason in contract.violations(values_of(message), architectures)]
