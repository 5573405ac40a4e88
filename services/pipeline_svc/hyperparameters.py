"""Job hyperparameters: the product defaults, merging a request over a pipeline's defaults, and
validation that names every bad field."""

from __future__ import annotations

import math

from segtrain.common.v1 import common_pb2

from services.common.errors import FieldViolation, check

DEFAULT_ARCHITECTURE = "upernet-convnext-base"
LOSSES = ("ce", "dice", "ce+dice")
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 4096


def product_defaults() -> common_pb2.Hyperparameters:
    """The seed product's defaults: batch 8, 10 epochs, lr 0.001, UperNet + ConvNeXt-base."""
    return common_pb2.Hyperparameters(
        batch_size=8, epochs=10, learning_rate=0.001, architecture=DEFAULT_ARCHITECTURE,
        weight_decay=0.01, seed=0, augment=True, loss="ce+dice", class_weights=False, checkpoint_every=1,
    )


def merge(base: common_pb2.Hyperparameters, overrides: common_pb2.Hyperparameters
          ) -> common_pb2.Hyperparameters:
    """`overrides`' set fields over `base`'s."""
    merged = common_pb2.Hyperparameters()
    merged.CopyFrom(base)
    for field, value in overrides.ListFields():
        setattr(merged, field.name, value)
    return merged


def validate(params: common_pb2.Hyperparameters, architectures: list[str], *, prefix: str) -> None:
    """Raises InvalidArgumentError naming each bad field (as `{prefix}.{field}`)."""
    v: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        v.append(FieldViolation(f"{prefix}.{field}", description))

    if params.HasField("batch_size") and not 1 <= params.batch_size <= MAX_BATCH_SIZE:
        bad("batch_size", f"must be between 1 and {MAX_BATCH_SIZE}, got {params.batch_size}")
    if params.HasField("epochs") and not 1 <= params.epochs <= MAX_EPOCHS:
        bad("epochs", f"must be between 1 and {MAX_EPOCHS}, got {params.epochs}")
    if params.HasField("learning_rate") and not (
        math.isfinite(params.learning_rate) and 0 < params.learning_rate <= 10
    ):
        bad("learning_rate", f"must be a finite number in (0, 10], got {params.learning_rate}")
    if params.HasField("architecture") and params.architecture not in architectures:
        bad("architecture", f"unknown architecture {params.architecture!r}; valid: {', '.join(architectures)}")
    if params.HasField("weight_decay") and not (math.isfinite(params.weight_decay) and params.weight_decay >= 0):
        bad("weight_decay", f"must be a finite number >= 0, got {params.weight_decay}")
    if params.HasField("crop_size") and not 16 <= params.crop_size <= 8192:
        bad("crop_size", f"must be between 16 and 8192, got {params.crop_size}")
    if params.HasField("loss") and params.loss not in LOSSES:
        bad("loss", f"must be one of {', '.join(LOSSES)}, got {params.loss!r}")
    if params.HasField("early_stopping_patience") and params.early_stopping_patience < 1:
        bad("early_stopping_patience", f"must be >= 1, got {params.early_stopping_patience}")
    if params.HasField("checkpoint_every") and params.checkpoint_every < 1:
        bad("checkpoint_every", f"must be >= 1, got {params.checkpoint_every}")
    if params.HasField("seed") and params.seed < 0:
        bad("seed", f"must be >= 0, got {params.seed}")
    check(v)
