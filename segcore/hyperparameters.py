"""The training-parameter contract: every parameter a job takes, in one place.

This module owns, for each training parameter: its name (the same in the proto's
``Hyperparameters``, ``TrainConfig`` and the CLI's ``--kebab-case`` flag), its type, its
default, its bounds or allowed values, and a one-line doc. Everything else derives from it:
* ``segcore.config.TrainConfig`` takes its defaults from ``DEFAULTS`` and validates through
  ``violations``;
* the pipeline service validates CreateJob/CreatePipeline through ``violations`` (so what a
  trainer node would reject is INVALID_ARGUMENT at CreateJob) and fills unset fields from
  ``DEFAULTS``;
* the CLI builds the flags of ``jobs create`` from ``PARAMETERS``.

It imports no torch (the pipeline service and the CLI import it). The architecture names are
the one set of allowed values that lives elsewhere (segcore.architectures, which needs torch):
callers pass them in.

Defaults over time: a pipeline stores only the fields its creator set, so fields it leaves unset
follow the code's defaults at the moment each job is created; a job stores its complete effective
parameters at CreateJob, so changing a default never changes an existing job or its rerun.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

NORMALIZATIONS = ("auto", "percentile", "dataset", "imagenet")
LOSSES = ("ce", "dice", "ce+dice")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_ARCHITECTURE = "upernet-convnext-base"
# ConvNeXt downsamples by 32; smaller inputs collapse to zero size at stage 4.
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class Parameter:
    """One training parameter. Numeric bounds are inclusive unless marked exclusive; an
    ``optional`` parameter may be unset (``None``), which its doc says the meaning of."""

    name: str
    kind: type  # int, float, bool or str
    default: object
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    architecture: bool = False  # allowed values: the architecture registry's names

    def violation(self, value: object, architectures: Collection[str] | None = None) -> str | None:
        """Why ``value`` is not acceptable, or None when it is."""
        if value is None:
            return None if self.optional else "is required"
        if not _has_kind(value, self.kind):
            return f"must be {_KIND_NAMES[self.kind]}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.architecture and architectures is not None and value not in architectures:
            return f"unknown architecture {value!r}; valid: {', '.join(sorted(architectures))}"
        if self.kind in (int, float) and not self._in_bounds(value):  # type: ignore[arg-type]
            return f"must be in {self.bounds_text()}, got {value!r}"
        return None

    def _in_bounds(self, value: float) -> bool:
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        return not (self.maximum is not None
                    and (value >= self.maximum if self.exclusive_maximum else value > self.maximum))

    def default_text(self) -> str:
        if self.default is None:
            return "unset"
        return str(self.default).lower() if self.kind is bool else str(self.default)

    def bounds_text(self) -> str:
        low = "(" if self.exclusive_minimum else "["
        high = ")" if self.exclusive_maximum else "]"
        return f"{low}{_number(self.minimum)}, {_number(self.maximum)}{high}"


_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _has_kind(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # bool is an int subclass; True as a batch size is a caller bug
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _number(value: float | None) -> str:
    if value is None:
        return "inf"
    return str(int(value)) if float(value).is_integer() else str(value)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("batch_size", int, 8, "tiles per optimisation step", minimum=1, maximum=4096),
    Parameter("epochs", int, 10, "passes over the training split", minimum=1, maximum=10_000),
    Parameter("learning_rate", float, 0.001, "AdamW learning rate (reached after the warm-up)",
              minimum=0.0, maximum=10.0, exclusive_minimum=True),
    Parameter("architecture", str, DEFAULT_ARCHITECTURE, "registered architecture name (see ListArchitectures)",
              architecture=True),
    Parameter("weight_decay", float, 0.01, "AdamW weight decay (not applied to biases and norm scales)",
              minimum=0.0, maximum=10.0),
    Parameter("seed", int, 0, "seed of initialisation, shuffling, crops and augmentation",
              minimum=0, maximum=2**32 - 1),
    Parameter("crop_size", int, None, "random square training crops in pixels; unset trains on whole tiles",
              minimum=MIN_INPUT_SIZE, maximum=8192, optional=True),
    Parameter("augment", bool, True, "flips, 90-degree rotations and intensity jitter relative to each image"),
    Parameter("loss", str, "ce+dice", "ce (cross-entropy), dice, or ce+dice (Dice added: small classes get learned)",
              choices=LOSSES),
    Parameter("class_weights", bool, False, "weight cross-entropy by inverse-sqrt class frequency"),
    Parameter("early_stopping_patience", int, None,
              "stop after this many epochs without validation IoU gain; unset never stops early",
              minimum=1, maximum=10_000, optional=True),
    Parameter("checkpoint_every", int, 1, "epochs between full-state checkpoints", minimum=1, maximum=10_000),
    Parameter("warmup_fraction", float, 0.05, "share of all steps spent on linear learning-rate warm-up",
              minimum=0.0, maximum=1.0, exclusive_maximum=True),
    Parameter("normalization", str, "auto",
              "auto (chosen from the data), percentile (per image), dataset (set mean/std) or imagenet",
              choices=NORMALIZATIONS),
    Parameter("percentile_low", float, 1.0, "percentile mapped to 0 by percentile normalization",
              minimum=0.0, maximum=50.0, exclusive_maximum=True),
    Parameter("percentile_high", float, 99.8, "percentile mapped to 1 by percentile normalization",
              minimum=50.0, maximum=100.0, exclusive_minimum=True),
    Parameter("lr_schedule", str, "constant",
              "after the warm-up: constant (the learning rate as given) or cosine (decay towards 0)",
              choices=LR_SCHEDULES),
)

BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}
# Any: TrainConfig's fields take their typed defaults from here (the contract test checks types).
DEFAULTS: dict[str, Any] = {p.name: p.default for p in PARAMETERS}


def violations(values: Mapping[str, object], architectures: Collection[str] | None = None
               ) -> list[tuple[str, str]]:
    """``(field, reason)`` for every value in ``values`` that the contract refuses. Only the
    names present are checked (a partial set of overrides is fine); unknown names are refused."""
    found = []
    for name, value in values.items():
        parameter = BY_NAME.get(name)
        reason = "is not a training parameter" if parameter is None else parameter.violation(value, architectures)
        if reason is not None:
            found.append((name, reason))
    return found


def resolved(overrides: Mapping[str, object]) -> dict[str, object]:
    """Every parameter: ``overrides`` over ``DEFAULTS``."""
    unknown = set(overrides) - set(BY_NAME)
    if unknown:
        raise KeyError(f"not training parameters: {', '.join(sorted(unknown))}")
    return {**DEFAULTS, **overrides}


def markdown_table() -> str:
    """The contract as the README shows it (a test keeps the README's copy identical)."""
    kinds = {int: "int", float: "float", bool: "bool", str: "string"}
    lines = ["| Parameter | CLI flag | Type | Default | Allowed | What |", "|---|---|---|---|---|---|"]
    for p in PARAMETERS:
        flag = "--" + p.name.replace("_", "-")
        flag = f"`{flag}` / `--no-{flag[2:]}`" if p.kind is bool else f"`{flag}`"
        default = p.default_text()
        if p.choices:
            allowed = ", ".join(f"`{c}`" for c in p.choices)
        elif p.architecture:
            allowed = "a registered architecture"
        else:
            allowed = p.bounds_text() if p.kind in (int, float) else "true, false"
        lines.append(f"| `{p.name}` | {flag} | {kinds[p.kind]} | `{default}` | {allowed} | {p.doc} |")
    return "\n".join(lines)
