"""Shared fixtures for segcore tests: offline hub, one torch thread, synthetic discs."""

from __future__ import annotations

import os

# Must be set before transformers is imported anywhere: tests never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator

import pytest
import torch
from segcore_testutil import DiscFactory, cpu_config, make_discs

from segcore.training import Sample, TrainConfig, TrainResult, train


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # The test machine is shared: with 2 OpenMP threads on 2 busy cores a step
    # can stall for seconds. One thread is steady and keeps timings meaningful.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def discs() -> DiscFactory:
    return make_discs


@pytest.fixture(scope="session")
def trained_discs() -> tuple[TrainConfig, TrainResult, list[Sample]]:
    """One model trained to segment discs, shared by learning/export/inference tests."""
    config = cpu_config(
        epochs=10, seed=0, num_threads=1
    )  # session scope: the module fixture is not active yet
    val = make_discs(8, 48, seed=2, prefix="v")
    return config, train(config, make_discs(24, 48, seed=1), val), val
