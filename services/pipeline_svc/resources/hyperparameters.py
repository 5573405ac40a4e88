"""Job hyperparameters on the pipeline service, as plain values by contract name: validation
through the one contract (segcore.hyperparameters), how they are stored, and the layers a job's
effective parameters are made of: the contract's defaults, then the pipeline's stored overrides,
then the request's."""

from __future__ import annotations

from collections.abc import Collection

from segtrain.common.v1 import common_pb2

from segcore import hyperparameters as contract
from services.common import hyperparameters as wire
from services.common.errors import FieldViolation, check
from services.pipeline_svc.domain import Hyperparameters


def validate(values: Hyperparameters, *, architectures: Collection[str], prefix: str) -> None:
    """Raises InvalidArgumentError naming each bad field (as `{prefix}.{field}`)."""
    check([FieldViolation(f"{prefix}.{name}", reason) for name, reason in contract.violations(values, architectures)])


def serialized(values: Hyperparameters) -> bytes:
    """The stored form (a serialized segtrain.common.v1.Hyperparameters of the set fields)."""
    return wire.message_of(values).SerializeToString()


def deserialized(data: bytes) -> dict[str, object]:
    return wire.values_of(common_pb2.Hyperparameters.FromString(data))


def pipeline_defaults(stored: Hyperparameters) -> dict[str, object]:
    """What jobs on a pipeline start from: its stored overrides over the contract's defaults."""
    return {**_contract_defaults(), **stored}


def effective(stored: Hyperparameters, overrides: Hyperparameters) -> dict[str, object]:
    """A job's complete parameters: the request's over the pipeline's over the contract's."""
    return {**_contract_defaults(), **stored, **overrides}


def _contract_defaults() -> dict[str, object]:
    return {name: value for name, value in contract.DEFAULTS.items() if value is not None}
