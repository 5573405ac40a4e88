"""Helpers shared by the segcore tests (a uniquely named module: conftest is not importable)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from segcore.training import Sample, TrainConfig

CPU_ARCH = "upernet-convnext-cpu"
DiscFactory = Callable[..., list[Sample]]


def make_discs(n: int, size: int = 48, seed: int = 0, prefix: str = "t") -> list[Sample]:
    """Bright discs (class 1) on dark noise (class 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for i in range(n):
        image = rng.uniform(0.0, 0.3, (size, size, 3)).astype(np.float32)
        mask = np.zeros((size, size), np.int64)
        for _ in range(2):
            cy, cx = rng.uniform(6, size - 6, 2)
            radius = rng.uniform(4, size / 5)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            mask[disc] = 1
            image[disc] = rng.uniform(0.7, 1.0, 3)
        samples.append(Sample(f"{prefix}{seed}_{i}", image, mask))
    return samples


def cpu_config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "class_names": ["background", "disc"],
        "architecture": CPU_ARCH,
        "batch_size": 8,
        "epochs": 3,
        "learning_rate": 3e-3,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]
