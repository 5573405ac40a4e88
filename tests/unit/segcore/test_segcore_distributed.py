"""Data-parallel training on torch.distributed (gloo, CPU): 2 processes against 1.

Each parallel run spawns its processes (torch.multiprocessing, a file rendezvous in tmp_path);
rank 0 writes what it saw to a file the test reads.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from segcore_testutil import cpu_config, make_discs

from segcore.architectures import build_model
from segcore.checkpoint import load_training_state, save_training_state
from segcore.data import plan_batches
from segcore.distributed import Group
from segcore.errors import InvalidParameterError
from segcore.imaging import Normalization
from segcore.training import NullObserver, TrainConfig, TrainingState, evaluate, train

CONFIG = {"epochs": 10, "seed": 0, "num_threads": 1, "batch_size": 8}
TRAIN = (24, 48, 1)  # tiles, size, seed
VAL = (9, 48, 2)  # an odd number: the two processes evaluate 5 and 4 tiles


def _data() -> tuple[list[Any], list[Any]]:
    return make_discs(TRAIN[0], TRAIN[1], seed=TRAIN[2]), make_discs(VAL[0], VAL[1], seed=VAL[2], prefix="v")


class _StopAfter(NullObserver):
    """Asks to stop after `batches` batches, on one rank only."""

    def __init__(self, rank: int, asking_rank: int, batches: int) -> None:
        self.asks = rank == asking_rank
        self.seen, self.limit = 0, batches

    def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.asks and self.seen >= self.limit


def _rank_main(rank: int, world: int, folder: str, task: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        out = _TASKS[task](rank, Path(folder))
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _train_task(rank: int, folder: Path) -> dict[str, Any]:
    checkpoints: list[int] = []

    def keep(state: TrainingState) -> None:
        checkpoints.append(state.epoch)
        if state.epoch == 3:
            (folder / "state3.pt").write_bytes(save_training_state(state))

    result = train(cpu_config(**CONFIG), *_data(), checkpoint=keep)
    return {"val_iou": [h.val_iou for h in result.history], "checkpoints": checkpoints,
            "weights": float(sum(v.double().sum() for v in result.final_state.values()))}


def _evaluate_task(rank: int, folder: Path) -> dict[str, Any]:
    model = build_model(cpu_config().architecture, 2)
    model.load_state_dict(torch.load(folder / "weights.pt"))
    loss, cm = evaluate(cpu_config(**CONFIG), model, _data()[1], Normalization.from_dict(
        json.loads((folder / "norm.json").read_text())))
    return {"matrix": cm.matrix.tolist(), "loss": loss}


def _stop_task(rank: int, folder: Path) -> dict[str, Any]:
    result = train(cpu_config(**CONFIG), *_data(), _StopAfter(rank, asking_rank=1, batches=4))
    return {"stopped": result.stopped, "epochs": len(result.history)}


_TASKS = {"train": _train_task, "evaluate": _evaluate_task, "stop": _stop_task}


def _parallel(task: str, folder: Path, world: int = 2) -> list[dict[str, Any]]:
    mp.spawn(_rank_main, args=(world, str(folder), task), nprocs=world, join=True)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def test_one_and_two_processes_compute_identical_metrics_over_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build_model(cpu_config().architecture, 2)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    norm = Normalization(mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3))
    (tmp_path / "norm.json").write_text(json.dumps(norm.to_dict()))
    loss, cm = evaluate(cpu_config(**CONFIG), model, _data()[1], norm)
    ranks = _parallel("evaluate", tmp_path)
    assert ranks[0]["matrix"] == ranks[1]["matrix"] == cm.matrix.tolist()
    assert int(cm.matrix.sum()) == VAL[0] * VAL[1] ** 2  # each validation tile counted exactly once
    # The loss's Dice term is computed per batch, and the batches differ: close, not identical.
    assert ranks[0]["loss"] == ranks[1]["loss"] == pytest.approx(loss, rel=1e-3)


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path: Path) -> None:
    ranks = _parallel("stop", tmp_path)
    assert ranks[0] == ranks[1] == {"stopped": True, "epochs": 1}  # 3 batches per epoch: stopped in epoch 2


def test_shares_split_every_global_batch_without_padding() -> None:
    group = Group(rank=1, world_size=3)
    assert group.shares(list(range(7))) == [[0, 3, 6], [1, 4], [2, 5]]
    assert group.share(list(range(7))) == [1, 4]
    # A short last batch that would leave a process with fewer than two tiles joins the previous one.
    assert [len(b) for b in plan_batches(18, 8, None, processes=2)] == [8, 10]
    assert [len(b) for b in plan_batches(21, 8, None, processes=2)] == [8, 8, 5]
    assert [len(b) for b in plan_batches(9, 8, None, processes=1)] == [9]


def test_a_batch_smaller_than_the_group_is_refused_naming_it(tmp_path: Path) -> None:
    config = TrainConfig(**{**cpu_config(**CONFIG).__dict__, "batch_size": 2})
    with pytest.raises(InvalidParameterError) as info:
        train(config, *_data(), group=Group(rank=0, world_size=3))
    assert info.value.field == "batch_size"
    with pytest.raises(InvalidParameterError) as few:
        train(cpu_config(**CONFIG), make_discs(2, 32), make_discs(2, 32, seed=5), group=Group(rank=0, world_size=3))
    assert few.value.field == "processes"


def test_two_processes_learn_as_one_does_at_the_same_global_batch(tmp_path: Path) -> None:
    single = train(cpu_config(**CONFIG), *_data())
    ranks = _parallel("train", tmp_path)
    assert ranks[0]["val_iou"] == ranks[1]["val_iou"]  # all-reduced: every rank sees the same metrics
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and holds the same weights
    # The mIoU each reaches (the best epoch's: the registered model's). Per-epoch values differ
    # more: on CPU, BatchNorm normalises each process's 4 tiles, not all 8.
    assert single.best_val_iou is not None and single.best_val_iou > 0.8
    assert abs(max(ranks[0]["val_iou"]) - single.best_val_iou) <= 0.02
    assert ranks[0]["checkpoints"] == list(range(1, 11)) and ranks[1]["checkpoints"] == []  # rank 0 alone
    # The state a 2-process run saved resumes in one process (the bare model's weights, no DDP prefixes).
    state = load_training_state((tmp_path / "state3.pt").read_bytes())
    assert not any(k.startswith("module.") for k in state.model_state)
    resumed = train(cpu_config(**CONFIG), *_data(), init_state=state)
    assert [h.epoch for h in resumed.history] == list(range(1, 11))
    assert [h.val_iou for h in resumed.history[:3]] == ranks[0]["val_iou"][:3]
    assert resumed.best_val_iou is not None and abs(resumed.best_val_iou - single.best_val_iou) <= 0.02
