"""Resumable training state and the random-number-generator bookkeeping behind it.

This module owns ``TrainingState``: everything needed to continue a run after
epoch k exactly as if it had never stopped (weights, optimiser and scheduler
state, every RNG, best-so-far tracking, history). Serialising it to bytes lives
in ``segcore.checkpoint``; here it stays plain Python + tensors.

RNG states are stored as tensors, ints and lists only (numpy's key array is
turned into a list), so the saved file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcore.progress import EpochResult


@dataclass
class TrainingState:
    """Snapshot taken after ``epoch`` completed epochs (1-based count)."""

    epoch: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, Any]
    best_epoch: int | None
    best_val_iou: float | None
    best_model_state: dict[str, torch.Tensor] | None
    history: list[EpochResult]
    normalization: dict[str, list[float]]
    config: dict[str, Any]  # dataclasses.asdict(TrainConfig) of the run
    stale_epochs: int = 0  # epochs since the best one (early-stopping counter)
    extra: dict[str, Any] = field(default_factory=dict)  # free space for callers


def cpu_copy(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor cloned to CPU.

    ``state_dict()`` returns live references that the next optimiser step
    overwrites in place, so snapshots must own their tensors.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


def capture_rng() -> dict[str, Any]:
    """States of the global torch/CUDA/numpy/python RNGs. (The data's random choices need no
    state: they are seeded from the run's seed, the epoch and the tile; see segcore.distributed.)"""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng`` (a "data" generator state from an older checkpoint is unused)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.array(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_state_from_list(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)
