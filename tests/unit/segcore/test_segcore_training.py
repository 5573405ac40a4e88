"""The training loop: validation, learning, determinism, resume, stopping, batching policy."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from segcore_testutil import CPU_ARCH, DiscFactory, cpu_config

from segcore.architectures import build_model
from segcore.checkpoint import load_training_state, save_training_state
from segcore.data import num_train_batches, plan_batches
from segcore.errors import (
    IncompatibleModelError,
    InvalidParameterError,
    InvalidTileError,
    TrainingDivergedError,
    UnknownArchitectureError,
)
from segcore.imaging import Normalization
from segcore.losses import class_weights_from_masks, segmentation_loss
from segcore.training import (
    EpochResult,
    NullObserver,
    PrintObserver,
    Sample,
    TrainConfig,
    TrainingObserver,
    TrainingState,
    TrainResult,
    evaluate,
    train,
)


class Recorder(NullObserver):
    """Records every hook call; optionally asks to stop after N batches."""

    def __init__(self, stop_after_batches: int | None = None) -> None:
        self.events: list[tuple[object, ...]] = []
        self.batches = 0
        self.stop_after = stop_after_batches

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None:
        self.events.append(("start", epoch, epochs, num_batches))

    def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        self.batches += 1
        self.events.append(("batch", epoch, batch, num_batches, loss))

    def on_epoch_end(self, result: EpochResult) -> None:
        self.events.append(("end", result))

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.batches >= self.stop_after


def metrics(result: EpochResult) -> tuple[float, ...]:
    return (result.train_loss, result.train_iou, result.val_loss, result.val_iou, result.learning_rate)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("epochs", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("weight_decay", -0.1),
        ("warmup_fraction", 1.0),
        ("loss", "focal"),
        ("crop_size", 16),
        ("early_stopping_patience", 0),
        ("num_threads", 0),
        ("seed", -1),
        ("checkpoint_every", 0),
        ("class_names", ["background"]),
        ("class_names", ["background", "a", "a"]),
        ("device", "not-a-device"),
        ("augment", "yes"),
    ],
)
def test_validate_names_the_bad_field(field: str, value: object) -> None:
    config = replace(cpu_config(), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError) as info:
        config.validate()
    assert info.value.field == field


def test_validate_unknown_architecture_and_accepts_defaults() -> None:
    with pytest.raises(UnknownArchitectureError):
        cpu_config(architecture="nope").validate()
    TrainConfig(class_names=["background", "x"]).validate()
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="CUDA"):
            cpu_config(device="cuda").validate()


def test_log_line_format() -> None:
    result = EpochResult(3, 10, 0.04111, 0.89794, 0.05364, 0.87591, [0.9, None], 1e-3, 1.5, True)
    assert (
        result.log_line()
        == "Epoch 3/10: Train Loss 0.0411, Train IoU 0.8979, Val Loss 0.0536, Val IoU 0.8759"
    )


def test_observer_protocol_is_satisfied_by_null_observer() -> None:
    assert isinstance(NullObserver(), TrainingObserver)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("n, batch_size", [(1, 8), (2, 8), (8, 8), (9, 8), (10, 8), (17, 8), (3, 2), (25, 4)])
def test_plan_batches_keeps_every_sample_and_never_makes_a_batch_of_one(n: int, batch_size: int) -> None:
    batches = plan_batches(n, batch_size, torch.Generator().manual_seed(0))
    assert len(batches) == num_train_batches(n, batch_size)
    assert all(len(b) >= 2 for b in batches)
    assert set().union(*batches) == set(range(n))
    if n > 1:
        assert sorted(i for b in batches for i in b) == list(range(n))  # no duplicates either


def test_batch_of_one_does_not_crash(discs: DiscFactory) -> None:
    recorder = Recorder()
    result = train(cpu_config(epochs=1), discs(9, 32, seed=1), discs(3, 32, seed=2), recorder)
    assert recorder.events[0] == ("start", 1, 1, 1)  # 9 tiles, batch 8: one batch of 9
    assert len(result.history) == 1 and math.isfinite(result.history[0].train_loss)


def test_batch_size_one_is_honoured_with_frozen_batchnorm_statistics(discs: DiscFactory) -> None:
    recorder = Recorder()
    model = build_model("upernet-convnext-cpu", 2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in norms]
    result = train(cpu_config(epochs=1, batch_size=1), discs(3, 32, seed=1), discs(2, 32, seed=2), recorder,
                   model=model)
    assert recorder.events[0] == ("start", 1, 1, 3)  # three batches of one
    assert math.isfinite(result.history[0].train_loss)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))


def test_single_training_tile_trains(discs: DiscFactory) -> None:
    result = train(cpu_config(epochs=1), discs(1, 32, seed=1), discs(1, 32, seed=2))
    assert math.isfinite(result.history[0].train_loss)


def test_mixed_tile_sizes_are_padded(discs: DiscFactory) -> None:
    train_set = discs(3, 40, seed=1) + discs(3, 48, seed=2) + discs(2, 20, seed=3)
    result = train(cpu_config(epochs=1, batch_size=4), train_set, discs(2, 36, seed=4) + discs(1, 50, seed=5))
    assert math.isfinite(result.history[0].val_loss)


def test_invalid_sample_names_the_tile(discs: DiscFactory) -> None:
    bad = discs(4, 32, seed=1)
    bad[2].mask[0, 0] = 5
    with pytest.raises(InvalidTileError) as info:
        train(cpu_config(epochs=1), bad, discs(2, 32, seed=2))
    assert info.value.tile == bad[2].tile_id
    nan_image = discs(1, 32, seed=3)[0]
    nan_image.image[0, 0, 0] = float("nan")
    with pytest.raises(InvalidTileError, match="NaN"):
        train(cpu_config(epochs=1), [*discs(2, 32), nan_image], discs(2, 32, seed=2))
    wrong_shape = Sample("odd", np.zeros((32, 32, 3), np.float32), np.zeros((30, 32), np.int64))
    with pytest.raises(InvalidTileError, match="does not match"):
        train(cpu_config(epochs=1), [*discs(2, 32), wrong_shape], discs(2, 32, seed=2))
    with pytest.raises(InvalidParameterError) as empty:
        train(cpu_config(epochs=1), discs(2, 32), [])
    assert empty.value.field == "val_samples"


# --------------------------------------------------------------------------- learning


def test_learns_discs(trained_discs: tuple[TrainConfig, TrainResult, list[Sample]]) -> None:
    config, result, _ = trained_discs
    assert len(result.history) == config.epochs
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_val_iou is not None and result.best_val_iou > 0.7
    best = result.history[result.best_epoch - 1]  # type: ignore[operator]
    assert best.is_best and best.val_iou == result.best_val_iou
    assert all(h.val_iou <= best.val_iou for h in result.history)
    assert len(best.per_class_iou) == 2 and all(v is not None for v in best.per_class_iou)
    assert result.best_state is not None and set(result.best_state) == set(result.final_state)


def test_lr_schedule_warms_up_then_holds_or_decays(discs: DiscFactory) -> None:
    data = discs(12, 32, seed=1), discs(4, 32, seed=2)
    for schedule in ("constant", "cosine"):
        config = cpu_config(epochs=6, batch_size=4, lr_schedule=schedule)
        lrs = [h.learning_rate for h in train(config, *data).history]
        assert max(lrs) <= config.learning_rate  # warm-up (5% of 18 steps) ends inside epoch 1
        if schedule == "constant":
            assert lrs == [config.learning_rate] * 6
        else:
            assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.1 * config.learning_rate


def test_same_seed_same_first_epoch(discs: DiscFactory) -> None:
    data = discs(10, 32, seed=1), discs(4, 32, seed=2)
    runs = [train(cpu_config(epochs=1, seed=s), *data).history[0] for s in (5, 5, 6)]
    assert metrics(runs[0]) == metrics(runs[1])
    assert runs[0].per_class_iou == runs[1].per_class_iou
    assert metrics(runs[0]) != metrics(runs[2])


def test_resume_from_state_equals_uninterrupted_run(discs: DiscFactory) -> None:
    data = discs(8, 32, seed=1), discs(4, 32, seed=2)
    config = cpu_config(epochs=3, batch_size=3, loss="ce+dice", class_weights=True)
    saved: list[bytes] = []
    full = train(config, *data, checkpoint=lambda state: saved.append(save_training_state(state)))
    assert len(saved) == 3

    state = load_training_state(saved[0])  # after epoch 1, through bytes
    assert isinstance(state, TrainingState) and state.epoch == 1
    resumed = train(config, *data, init_state=state)

    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert metrics(a) == metrics(b)
    assert resumed.best_epoch == full.best_epoch
    for key, value in full.final_state.items():
        assert torch.equal(value, resumed.final_state[key]), key


def test_resume_refuses_mismatched_config(discs: DiscFactory) -> None:
    data = discs(4, 32, seed=1), discs(2, 32, seed=2)
    states: list[TrainingState] = []
    first = train(cpu_config(epochs=2), *data, checkpoint=states.append)
    with pytest.raises(InvalidParameterError) as done:
        train(cpu_config(epochs=1), *data, init_state=states[1])  # the state is past the last epoch
    assert done.value.field == "epochs"
    # A state of the last epoch resumes to its result without training (a node died finalising).
    finished = train(cpu_config(epochs=2), *data, init_state=states[1])
    assert finished.history == first.history and finished.best_epoch == first.best_epoch
    with pytest.raises(IncompatibleModelError):
        train(cpu_config(epochs=2, class_names=["bg", "a", "b"]), *data, init_state=states[0])


def test_should_stop_stops_within_one_batch(discs: DiscFactory) -> None:
    recorder = Recorder(stop_after_batches=2)
    result = train(cpu_config(epochs=3, batch_size=2), discs(8, 32), discs(2, 32, seed=2), recorder)
    assert result.stopped and not result.early_stopped
    assert recorder.batches == 2
    assert [e[0] for e in recorder.events] == ["start", "batch", "batch"]
    assert result.history == [] and result.best_state is None and result.best_epoch is None


class StopOnPoll(NullObserver):
    """Asks to stop at the n-th should_stop poll."""

    def __init__(self, stop_at_poll: int) -> None:
        self.polls = 0
        self.stop_at = stop_at_poll

    def should_stop(self) -> bool:
        self.polls += 1
        return self.polls >= self.stop_at


def test_should_stop_is_polled_during_validation(discs: DiscFactory) -> None:
    observer = StopOnPoll(stop_at_poll=5)  # 4 training batches, then the first validation batch
    result = train(cpu_config(epochs=2, batch_size=2), discs(8, 32), discs(6, 32, seed=2), observer)
    assert result.stopped
    assert observer.polls == 5
    assert result.history == []


def test_print_observer_threads_and_given_normalization(
    discs: DiscFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    norm = Normalization(mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3))
    before = torch.get_num_threads()
    config = cpu_config(epochs=2, num_threads=before + 1)
    result = train(config, discs(4, 32), discs(2, 32, seed=2), PrintObserver(), normalization=norm)
    assert torch.get_num_threads() == before  # process-global setting restored
    assert result.normalization == norm
    lines = capsys.readouterr().out.splitlines()
    assert lines == [h.log_line() for h in result.history]
    assert lines[0].startswith("Epoch 1/2: Train Loss ")


def test_observer_sees_every_batch_and_epoch(discs: DiscFactory) -> None:
    recorder = Recorder()
    result = train(cpu_config(epochs=2, batch_size=4), discs(8, 32), discs(2, 32, seed=2), recorder)
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start", "batch", "batch", "end"] * 2
    assert [e[2] for e in recorder.events if e[0] == "batch"] == [1, 2, 1, 2]
    assert [e[1] for e in recorder.events if e[0] == "end"] == result.history


class ConstantModel(torch.nn.Module):
    """Always predicts background: validation IoU never improves."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([5.0, -5.0]))

    def forward(self, pixel_values: torch.Tensor) -> object:
        logits = torch.zeros(pixel_values.shape[0], 2, *pixel_values.shape[2:]) + self.bias.view(1, 2, 1, 1)
        return type("Out", (), {"logits": logits.detach() + 0 * self.bias.sum()})()


def test_early_stopping_and_checkpoint_every(discs: DiscFactory) -> None:
    calls: list[int] = []
    config = cpu_config(epochs=6, early_stopping_patience=2, checkpoint_every=2, learning_rate=1e-6)
    result = train(
        config,
        discs(4, 32),
        discs(2, 32, seed=2),
        model=ConstantModel(),
        checkpoint=lambda s: calls.append(s.epoch),
    )
    assert result.early_stopped and not result.stopped
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert result.best_epoch == 1
    assert calls == [2]


class NanModel(ConstantModel):
    def forward(self, pixel_values: torch.Tensor) -> object:
        out = super().forward(pixel_values)
        out.logits = out.logits * float("nan")  # type: ignore[attr-defined]
        return out


def test_diverged_training_raises_instead_of_continuing(discs: DiscFactory) -> None:
    with pytest.raises(TrainingDivergedError) as info:
        train(cpu_config(epochs=2), discs(4, 32), discs(2, 32, seed=2), model=NanModel())
    assert (info.value.epoch, info.value.batch) == (1, 1)


# --------------------------------------------------------------------------- losses


def test_losses_ignore_unlabelled_pixels_and_weights() -> None:
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ce = segmentation_loss(logits, target, "ce")
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, target))
    weights = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(
        segmentation_loss(logits, target, "ce", class_weights=weights),
        torch.nn.functional.cross_entropy(logits, target, weight=weights),
    )
    ignored = torch.full_like(target, 255)
    assert segmentation_loss(logits, ignored, "ce+dice").item() == pytest.approx(0.0)  # no NaN
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert segmentation_loss(perfect, target, "dice").item() < 1e-3
    small = segmentation_loss(torch.randn(2, 3, 4, 4), target, "ce")  # logits upsampled to mask
    assert torch.isfinite(small)


def test_class_weights_favour_rare_classes() -> None:
    masks = [torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 255, 255], [0, 0, 0, 0]])]
    weights = class_weights_from_masks(masks, 3, 255)
    assert weights[1] > weights[0]
    assert weights[2] == 1.0  # absent class
    assert weights[:2].mean().item() == pytest.approx(1.0)


def test_crop_and_augment_paths_run(discs: DiscFactory) -> None:
    config = cpu_config(epochs=1, crop_size=32, loss="dice", class_weights=True)
    result = train(config, discs(6, 48), discs(2, 40, seed=2))
    assert math.isfinite(result.history[0].train_loss)
    assert result.model is not None and config.architecture == CPU_ARCH


def test_validation_of_tiles_larger_than_the_crop_runs_in_windows_of_the_crop(discs: DiscFactory) -> None:
    """Validation's memory is bounded by training's: no forward pass sees more than the crop."""
    sizes: list[tuple[int, int]] = []
    model = build_model(CPU_ARCH, 2)
    model.register_forward_pre_hook(lambda _m, _a, kwargs: sizes.append(tuple(kwargs["pixel_values"].shape)),
                                    with_kwargs=True)
    norm = Normalization(mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3))
    _, windowed = evaluate(cpu_config(crop_size=32, batch_size=2), model, discs(4, 80, seed=4), norm)
    assert sizes and all(s[-2:] == (32, 32) and s[0] <= 2 for s in sizes)
    assert int(windowed.matrix.sum()) == 4 * 80 * 80  # every pixel scored once, whatever the windows
    sizes.clear()
    _, whole = evaluate(cpu_config(crop_size=None, batch_size=2), model, discs(4, 80, seed=4), norm)
    assert {s[-2:] for s in sizes} == {(80, 80)}
    assert int(whole.matrix.sum()) == int(windowed.matrix.sum())
