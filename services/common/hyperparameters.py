"""The training-parameter contract (segcore.hyperparameters) on the wire: the proto
``Hyperparameters`` message to and from plain values by contract name. Both the pipeline
service (requests, stored parameters) and the trainer node (RunJob) go through here."""

from __future__ import annotations

from collections.abc import Mapping

from segtrain.common.v1 import common_pb2


def values_of(message: common_pb2.Hyperparameters) -> dict[str, object]:
    """The fields set on ``message``, by contract name."""
    return {field.name: value for field, value in message.ListFields()}


def message_of(values: Mapping[str, object]) -> common_pb2.Hyperparameters:
    """A message with every value that is not None (unset optional parameters stay unset)."""
    return common_pb2.Hyperparameters(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]
