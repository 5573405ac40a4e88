"""Job hyperparameters on the pipeline service: validation at CreateJob/CreatePipeline through the
one contract (segcore.hyperparameters), and the layers a job's effective parameters are made of:
the contract's defaults, then the pipeline's stored overrides, then the request's."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2

from services.common import hyperparameters as wire
from services.common.errors import check


def validate(params: common_pb2.Hyperparameters, architectures: list[str], *, prefix: str) -> None:
    """Raises InvalidArgumentError naming each bad field (as `{prefix}.{field}`)."""
    check(wire.violations(params, architectures, prefix=prefix))


def pipeline_defaults(stored: common_pb2.Hyperparameters) -> common_pb2.Hyperparameters:
    """What jobs on a pipeline start from: its stored overrides over the contract's defaults."""
    return wire.merged(wire.product_defaults(), stored)


def effective(stored: common_pb2.Hyperparameters, overrides: common_pb2.Hyperparameters
              ) -> common_pb2.Hyperparameters:
    """A job's complete parameters: the request's over the pipeline's over the contract's."""
    return wire.merged(wire.product_defaults(), stored, overrides)
