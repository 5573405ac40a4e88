"""The training loop.

This module owns ``train()``. It reads top to bottom: set up (model, optimiser,
schedule, data), then for each epoch train, validate, record, checkpoint.
Everything the outside world sees leaves through three channels:
* ``TrainingObserver`` (four hooks: epoch start, batch end, epoch end,
  should_stop) for progress and cancellation;
* the optional ``checkpoint`` callback, handed a full ``TrainingState`` every
  ``checkpoint_every`` epochs so a job can resume after a crash;
* the returned ``TrainResult``.

Reproducibility: the seed drives model init (global torch RNG) and the data's
random choices: each epoch's order from (seed, epoch), each tile's crop and
augmentation from (seed, epoch, tile). On CPU two runs with the same seed give
identical metrics, and resuming from the state saved after epoch k continues
exactly like the uninterrupted run. bf16 autocast and channels_last are used
on CUDA only.

Data-parallel runs: started in every process of an initialised torch.distributed
group (or given ``group``), ``train`` splits each global batch over the
processes, wraps the model in DistributedDataParallel, all-reduces metrics and
agrees on every early end (segcore.distributed). BatchNorm: SyncBatchNorm on
CUDA; on CPU (gloo) each process normalises its own share of the batch and the
running statistics are rank 0's, broadcast at each step (DDP's default).
Only rank 0 calls ``checkpoint``; every rank returns the same result.

``TrainConfig`` (segcore.config), ``TrainingState`` (segcore.state), ``Sample``
(segcore.data) and the observer types (segcore.progress) are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcore.architectures import build_model
from segcore.config import TrainConfig, resolve_device
from segcore.data import Sample, batch_of, num_train_batches, plan_batches
from segcore.distributed import Group, mixed_seed
from segcore.errors import IncompatibleModelError, InvalidParameterError, TrainingDivergedError
from segcore.inference import window_starts
from segcore.intensity import Normalization, choose_normalization
from segcore.losses import class_weights_from_counts, segmentation_loss
from segcore.metrics import IGNORE_INDEX, ConfusionMatrix, argmax_classes
from segcore.progress import EpochResult, NullObserver, PrintObserver, TrainingObserver
from segcore.state import TrainingState, capture_rng, cpu_copy, restore_rng
from segcore.tiles import (
    BatchStream,
    Joined,
    KnownMeasures,
    PreparedTiles,
    ScanResult,
    TileRequest,
    TileSource,
    prepared_cache_budget,
    scan,
    start_loader_server,
)

# Threads that read tiles for the checking pass before training.
_SCAN_THREADS = 4
_CROP_STREAM = 1  # the crops' seeds: mixed_seed(seed, epoch, tile + 1, occurrence, _CROP_STREAM)

__all__ = [
    "EpochResult",
    "NullObserver",
    "PrintObserver",
    "Sample",
    "TileSource",
    "TrainConfig",
    "TrainResult",
    "TrainingObserver",
    "TrainingState",
    "evaluate",
    "resolve_device",
    "train",
]


@dataclass
class TrainResult:
    """What ``train`` returns. State dicts are CPU copies."""

    model: torch.nn.Module  # holds the final (not the best) weights
    final_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor] | None  # None if no epoch completed
    best_epoch: int | None
    best_val_iou: float | None
    history: list[EpochResult]
    normalization: Normalization
    stopped: bool = False  # observer.should_stop() ended training
    early_stopped: bool = False  # patience ran out


# ------------------------------------------------------------------------ the run


@dataclass
class _Run:
    """Mutable state of one training run, shared by the loop's helpers."""

    config: TrainConfig
    device: torch.device
    group: Group
    model: torch.nn.Module
    forward: torch.nn.Module  # the model, wrapped in DistributedDataParallel in a parallel run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    norm: Normalization
    tiles: BatchStream  # prepared as their batches come up, never all at once: training's, then validation's
    train_count: int
    val_count: int
    class_weights: torch.Tensor | None
    start_epoch: int = 0
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_iou: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale_epochs: int = 0  # epochs since the best one, for early stopping
    last_lr: float = 0.0  # LR of the most recent optimiser step

    @property
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return _autocast(self.device)

    def to_device(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_device(self.device, images, masks)

    @property
    def validation(self) -> _Validation:
        return _Validation(self.config, self.device, self.group, self.model, self.tiles, self.train_count,
                           self.val_count, self.class_weights)


@dataclass(frozen=True)
class _Validation:
    """What validation needs: the model and where the validation tiles are in the stream."""

    config: TrainConfig
    device: torch.device
    group: Group
    model: torch.nn.Module
    tiles: BatchStream
    first: int  # index of the first validation tile in `tiles`
    count: int
    class_weights: torch.Tensor | None


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(device: torch.device, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)


def train(
    config: TrainConfig,
    train_samples: Sequence[Sample] | TileSource,
    val_samples: Sequence[Sample] | TileSource,
    observer: TrainingObserver | None = None,
    *,
    init_state: TrainingState | None = None,
    model: torch.nn.Module | None = None,
    normalization: Normalization | None = None,
    checkpoint: Callable[[TrainingState], None] | None = None,
    group: Group | None = None,
    known: tuple[KnownMeasures, KnownMeasures] | None = None,
) -> TrainResult:
    """Train ``config.architecture`` (or ``model``) and return weights and history.

    The samples may be lists or any ``TileSource`` that loads a tile when asked (segcore.tiles):
    tiles are streamed, never held all at once. ``normalization`` defaults to statistics of
    the training images (or the one stored in ``init_state``). ``init_state`` resumes a run;
    ``checkpoint`` receives a full TrainingState every ``config.checkpoint_every`` epochs (on
    rank 0 only). ``group`` defaults to the initialised process group, if any. ``known``: what
    preparing the set measured of the (training, validation) tiles; with it, no tile is read
    before the first batch (unless the job's normalization uses a scaling it did not measure).
    """
    config.validate()
    observer = observer or NullObserver()
    group = group or Group.current()
    with _thread_limit(config.num_threads):
        run = _setup(config, train_samples, val_samples, init_state, model, normalization, group, known)
        try:
            return _train_run(run, config, observer, checkpoint)
        finally:
            run.tiles.close()


def _train_run(run: _Run, config: TrainConfig, observer: TrainingObserver,
               checkpoint: Callable[[TrainingState], None] | None) -> TrainResult:
    """The epochs: train, validate, record, checkpoint; until done, stopped or out of patience."""
    stopped = early_stopped = False
    for epoch in range(run.start_epoch + 1, config.epochs + 1):
        result = _run_epoch(run, epoch, observer)
        if result is None:
            stopped = True  # the observer asked; the partial epoch is not recorded
            break
        observer.on_epoch_end(result)
        due = epoch % config.checkpoint_every == 0 or epoch == config.epochs
        if checkpoint is not None and due and run.group.primary:
            checkpoint(_snapshot(run, epoch))
        patience = config.early_stopping_patience
        if patience is not None and run.stale_epochs >= patience and epoch < config.epochs:
            early_stopped = True
            break
    return TrainResult(
        model=run.model,
        final_state=cpu_copy(run.model.state_dict()),
        best_state=run.best_state,
        best_epoch=run.best_epoch,
        best_val_iou=run.best_val_iou,
        history=list(run.history),
        normalization=run.norm,
        stopped=stopped,
        early_stopped=early_stopped,
    )


@contextlib.contextmanager
def _thread_limit(num_threads: int | None) -> Iterator[None]:
    # torch's thread count is process-global; restore it so a notebook or a
    # service process is not left changed after training returns.
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _setup(
    config: TrainConfig,
    train_samples: TileSource,
    val_samples: TileSource,
    init_state: TrainingState | None,
    model: torch.nn.Module | None,
    normalization: Normalization | None,
    group: Group,
    known: tuple[KnownMeasures, KnownMeasures] | None,
) -> _Run:
    device = resolve_device(config.device)
    if init_state is not None:
        _check_resumable(config, init_state)
        normalization = Normalization.from_dict(init_state.normalization)
    _check_split(config, len(train_samples), group)
    if config.data_workers:  # the loaders' imports run while the tiles are checked
        start_loader_server(Joined(train_samples, val_samples))
    n = config.num_classes
    # One pass over every tile before training (on rank 0 for the whole group): each is checked (a
    # bad tile fails the run now, naming it, not hours in) while the class counts and
    # normalization statistics accumulate. Each tile's normalization measures are kept from this
    # pass too: the loaders then only decode and cut. A set prepared by the pipeline service was
    # checked and measured then (`known`): no pass at all.
    def check_and_measure() -> tuple[ScanResult, ScanResult]:
        if normalization is not None:  # a resumed run's or a parent model's: measured as it scales
            mode, low, high = normalization.mode, normalization.percentile_low, normalization.percentile_high
        else:
            mode, low, high = _mode_for(config, train_samples), config.percentile_low, config.percentile_high

        def checked(samples: TileSource, field: str, compute: bool, measured: KnownMeasures | None) -> ScanResult:
            return scan(samples, num_classes=n, ignore_index=IGNORE_INDEX, field=field, mode=mode,
                        percentile_low=low, percentile_high=high, threads=_SCAN_THREADS,
                        compute_normalization=compute, known=measured)
        train_known, val_known = known or (None, None)
        return (checked(train_samples, "train_samples", normalization is None, train_known),
                checked(val_samples, "val_samples", False, val_known))

    found, val_found = group.from_primary(check_and_measure)
    norm = normalization or found.normalization
    assert norm is not None
    measures = _joined_measures(found, val_found)
    # One loader (and one set of worker processes) serves both splits: validation's tiles follow
    # the training tiles' indices.
    tiles = BatchStream(PreparedTiles(Joined(train_samples, val_samples), norm, n, IGNORE_INDEX, measures),
                        workers=config.data_workers, pin_memory=device.type == "cuda",
                        # every rank trains on every tile over the epochs: each keeps its part
                        cache_bytes=prepared_cache_budget(found.prepared_bytes + val_found.prepared_bytes,
                                                          config.prepared_cache_mb * 2**20 // group.world_size))
    _seed_everything(config.seed)  # before building: weight init draws from the global RNG
    model, forward = _placed(model if model is not None else build_model(config.architecture, n), device, group)
    optimizer = _make_optimizer(model, config)
    num_batches = num_train_batches(len(train_samples), config.batch_size, group.world_size)
    scheduler = _make_scheduler(optimizer, config, num_batches)
    weights = class_weights_from_counts(found.class_pixels).to(device) if config.class_weights else None
    run = _Run(config, device, group, model, forward, optimizer, scheduler, norm, tiles, len(train_samples),
               len(val_samples), weights)
    if init_state is not None:
        _restore(run, init_state)
    return run


def _check_split(config: TrainConfig, train_count: int, group: Group) -> None:
    """Every process needs a tile of every batch."""
    if group.parallel and config.batch_size < group.world_size:
        raise InvalidParameterError("batch_size", f"a batch of {config.batch_size} cannot be split over "
                                    f"{group.world_size} processes: give each at least one tile")
    if group.parallel and train_count < group.world_size:
        raise InvalidParameterError("processes", f"the training split has {train_count} tiles, fewer than the "
                                    f"{group.world_size} processes that would share it")


def _placed(model: torch.nn.Module, device: torch.device, group: Group) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model on its device, and what the training steps call: the model itself, or in a
    parallel run the model in DistributedDataParallel (which starts every rank from rank 0's
    weights and averages the gradients)."""
    if group.parallel and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if not group.parallel:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def _mode_for(config: TrainConfig, samples: TileSource) -> str:
    """The config's normalization mode; "auto" is resolved from the training images' profile (as
    the pipeline service resolves it from a training set's), which costs one more pass."""
    if config.normalization != "auto":
        return config.normalization
    profile = scan(samples, num_classes=config.num_classes, ignore_index=IGNORE_INDEX, field="train_samples",
                   threads=_SCAN_THREADS).profile
    mode, _ = choose_normalization(config.normalization, profile)
    return mode


def _joined_measures(train: ScanResult, val: ScanResult) -> np.ndarray | None:
    if train.measures is None or val.measures is None:
        return None
    return np.concatenate([train.measures, val.measures])


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-D tensors): decaying them
    # toward zero only fights the normalisation layers.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, num_batches: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * num_batches
    warmup = round(config.warmup_fraction * total)

    cosine = config.lr_schedule == "cosine"

    def factor(step: int) -> float:
        # Linear warm-up from 1/warmup to 1, then constant or cosine decay towards 0.
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _run_epoch(run: _Run, epoch: int, observer: TrainingObserver) -> EpochResult | None:
    """Train and validate one epoch; None if the observer asked to stop."""
    started = time.perf_counter()
    trained = _train_epoch(run, epoch, observer)
    if trained is None:
        return None
    evaluated = _evaluate(run.validation, observer)
    if evaluated is None:
        return None
    return _record_epoch(run, epoch, *trained, *evaluated, started)


def _train_epoch(run: _Run, epoch: int, observer: TrainingObserver) -> tuple[float, float] | None:
    """One pass over the training set: (mean loss, mIoU), or None when stopped."""
    cfg, group = run.config, run.group
    run.forward.train()
    batches = plan_batches(run.train_count, cfg.batch_size, _epoch_order(cfg.seed, epoch), group.world_size)
    observer.on_epoch_start(epoch, cfg.epochs, len(batches))
    shares = [group.share(batch) for batch in batches]
    requests = [group.share(_crops(cfg.seed, epoch, cfg.crop_size, batch)) for batch in batches]
    cm = ConfusionMatrix(cfg.num_classes)
    loss_sum, seen = 0.0, 0
    for b, (batch, share, prepared) in enumerate(zip(batches, shares, run.tiles.batches(requests), strict=True),
                                                 start=1):
        images, masks = batch_of(
            prepared,
            generator=group.share(_tile_draws(cfg.seed, epoch, batch)),
            crop_size=cfg.crop_size,
            augment_data=cfg.augment,
            ignore_index=IGNORE_INDEX,
        )
        images, masks = run.to_device(images, masks)
        single = min(len(s) for s in group.shares(batch)) == 1  # the same decision on every rank
        with run.autocast, _batchnorm_statistics_frozen(run.model, single):
            logits = run.forward(pixel_values=images).logits
        loss = segmentation_loss(logits, masks, cfg.loss, class_weights=run.class_weights)
        loss_value = float(loss.detach())
        diverged, stop = group.agree([not math.isfinite(loss_value), observer.should_stop()])
        if diverged:
            # Stepping on a NaN/inf loss would silently poison every weight.
            raise TrainingDivergedError(epoch, b, loss_value)
        if stop:
            return None
        if group.parallel:  # DDP averages over ranks; weigh each rank's mean by its share of the batch
            loss = loss * (len(share) * group.world_size / len(batch))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.last_lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()  # per step, not per epoch: warm-up must work for short runs
        cm.update(_predict(logits, masks), masks)
        loss_sum, seen = loss_sum + loss_value * len(share), seen + len(share)
        observer.on_batch_end(epoch, b, len(batches), loss_value)
    group.share_buffers(run.model)
    totals = group.sum(torch.tensor([loss_sum, seen], dtype=torch.float64))
    return float(totals[0] / totals[1]), cm.replaced(group.sum(cm.matrix)).mean_iou()


def _epoch_order(seed: int, epoch: int) -> torch.Generator:
    """The epoch's tile order: the same on every rank (DistributedSampler's seed + set_epoch)."""
    return torch.Generator().manual_seed(mixed_seed(seed, epoch))


def _tile_draws(seed: int, epoch: int, batch: list[int]) -> list[torch.Generator]:
    """Each tile's augmentation in an epoch, whichever rank trains it (a tile twice in a batch,
    the only tile of a set, gets two different views)."""
    return [torch.Generator().manual_seed(mixed_seed(seed, epoch, tile + 1, occurrence))
            for tile, occurrence in _occurrences(batch)]


def _crops(seed: int, epoch: int, crop_size: int | None, batch: list[int]) -> list[TileRequest]:
    """Each tile's request, with the seed of its random crop (a stream apart from its
    augmentation's: the crop is cut wherever the tile is loaded)."""
    return [TileRequest(tile, crop_size or 0, mixed_seed(seed, epoch, tile + 1, occurrence, _CROP_STREAM))
            for tile, occurrence in _occurrences(batch)]


def _occurrences(batch: list[int]) -> Iterator[tuple[int, int]]:
    seen: dict[int, int] = {}
    for tile in batch:
        seen[tile] = seen.get(tile, -1) + 1
        yield tile, seen[tile]


@contextlib.contextmanager
def _batchnorm_statistics_frozen(model: torch.nn.Module, frozen: bool) -> Iterator[None]:
    """With a single sample BatchNorm cannot compute batch statistics (UperNet's 1x1 pooling
    branch raises); use the running statistics instead, leaving the affine weights trainable."""
    if not frozen:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _predict(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    logits = logits.detach()
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = torch.nn.functional.interpolate(
            logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
    return argmax_classes(logits, dim=1)


def evaluate(config: TrainConfig, model: torch.nn.Module, samples: Sequence[Sample] | TileSource,
             normalization: Normalization, *, group: Group | None = None) -> tuple[float, ConfusionMatrix]:
    """Validation loss (without class weights) and confusion matrix of `model` on `samples`,
    computed as training computes them after each epoch: in a parallel run each process
    evaluates its share and the sums are all-reduced."""
    config.validate()
    device = resolve_device(config.device)
    tiles = BatchStream(PreparedTiles(samples, normalization, config.num_classes, IGNORE_INDEX),
                        workers=config.data_workers)
    try:
        evaluated = _evaluate(_Validation(config, device, group or Group.current(), model.to(device), tiles, 0,
                                          len(samples), None), NullObserver())
    finally:
        tiles.close()
    assert evaluated is not None  # NullObserver never stops
    return evaluated


@torch.no_grad()
def _evaluate(run: _Validation, observer: TrainingObserver) -> tuple[float, ConfusionMatrix] | None:
    """Validation loss and confusion matrix in eval mode (no augmentation), each tile evaluated
    by exactly one rank and the sums all-reduced. A tile larger than the crop size is evaluated
    in overlapping windows of that size (logits averaged where they overlap), so validation's
    memory is bounded by training's, whatever the tile size.

    should_stop is polled after validation batches too (None when stopped): a
    large validation set must not delay a cancellation by minutes.
    """
    cfg, group = run.config, run.group
    run.model.eval()
    cm = ConfusionMatrix(cfg.num_classes)
    loss_sum, seen = 0.0, 0
    shares = [[TileRequest(run.first + i) for i in group.share(batch)]
              for batch in plan_batches(run.count, cfg.batch_size, None, group.world_size)]
    for share, prepared in zip(shares, run.tiles.batches(shares), strict=True):
        if share:
            images, masks = batch_of(prepared, generator=None, crop_size=None, augment_data=False,
                                     ignore_index=IGNORE_INDEX)
            images, masks = _to_device(run.device, images, masks)
            with _autocast(run.device):
                logits = _windowed_logits(run.model, images, cfg.crop_size)
            loss = segmentation_loss(logits, masks, cfg.loss, class_weights=run.class_weights)
            cm.update(_predict(logits, masks), masks)
            loss_sum, seen = loss_sum + float(loss) * len(share), seen + len(share)
        if group.agree([observer.should_stop()])[0]:
            return None
    totals = group.sum(torch.tensor([loss_sum, seen], dtype=torch.float64))
    return float(totals[0] / totals[1]), cm.replaced(group.sum(cm.matrix))


def _windowed_logits(model: torch.nn.Module, images: torch.Tensor, window: int | None) -> torch.Tensor:
    """The model's logits for a batch, at the images' size; images larger than `window` are
    run a window at a time (overlapping by a quarter), each window for the whole batch."""
    height, width = images.shape[-2:]
    if window is None or (height <= window and width <= window):
        return model(pixel_values=images).logits
    win_h, win_w = min(window, height), min(window, width)
    total: torch.Tensor | None = None
    hits = torch.zeros(height, width, device=images.device)
    for top in window_starts(height, win_h, win_h // 4):
        for left in window_starts(width, win_w, win_w // 4):
            crop = images[:, :, top : top + win_h, left : left + win_w]
            logits = model(pixel_values=crop).logits.float()
            if logits.shape[-2:] != crop.shape[-2:]:
                logits = torch.nn.functional.interpolate(logits, size=crop.shape[-2:], mode="bilinear",
                                                         align_corners=False)
            if total is None:
                total = torch.zeros(*logits.shape[:2], height, width, device=images.device)
            total[:, :, top : top + win_h, left : left + win_w] += logits
            hits[top : top + win_h, left : left + win_w] += 1
    assert total is not None
    return total / hits


def _record_epoch(
    run: _Run,
    epoch: int,
    train_loss: float,
    train_iou: float,
    val_loss: float,
    val_cm: ConfusionMatrix,
    started: float,
) -> EpochResult:
    val_iou = val_cm.mean_iou()
    is_best = run.best_val_iou is None or val_iou > run.best_val_iou
    if is_best:
        run.best_epoch, run.best_val_iou, run.stale_epochs = epoch, val_iou, 0
        run.best_state = cpu_copy(run.model.state_dict())
    else:
        run.stale_epochs += 1
    result = EpochResult(
        epoch=epoch,
        epochs=run.config.epochs,
        train_loss=train_loss,
        train_iou=train_iou,
        val_loss=val_loss,
        val_iou=val_iou,
        per_class_iou=val_cm.iou_per_class(),
        val_true_pixels=[int(v) for v in val_cm.matrix.sum(dim=1).tolist()],
        val_pred_pixels=[int(v) for v in val_cm.matrix.sum(dim=0).tolist()],
        learning_rate=run.last_lr,
        seconds=time.perf_counter() - started,
        is_best=is_best,
    )
    run.history.append(result)
    return result


# --------------------------------------------------------------------- state & resume


def _check_resumable(config: TrainConfig, state: TrainingState) -> None:
    saved = state.config
    if saved.get("architecture") != config.architecture:
        raise IncompatibleModelError(
            f"state was trained with {saved.get('architecture')!r}, config asks for {config.architecture!r}"
        )
    if list(saved.get("class_names", [])) != list(config.class_names):
        raise IncompatibleModelError("state was trained with different class names")
    # A state of the last epoch is resumable: nothing is left to train and train() returns its
    # result (a node that died while finalising hands the job to one that only finalises).
    if state.epoch > config.epochs:
        raise InvalidParameterError(
            "epochs", f"state already completed {state.epoch} epochs, more than the {config.epochs} asked for"
        )


def _snapshot(run: _Run, epoch: int) -> TrainingState:
    return TrainingState(
        epoch=epoch,
        model_state=cpu_copy(run.model.state_dict()),
        optimizer_state=cpu_copy(run.optimizer.state_dict()),
        scheduler_state=cpu_copy(run.scheduler.state_dict()),
        rng_state=capture_rng(),
        best_epoch=run.best_epoch,
        best_val_iou=run.best_val_iou,
        best_model_state=run.best_state,  # already a private CPU copy
        history=list(run.history),
        normalization=run.norm.to_dict(),
        config=dataclasses.asdict(run.config),
        stale_epochs=run.stale_epochs,
    )


def _restore(run: _Run, state: TrainingState) -> None:
    try:
        run.model.load_state_dict(state.model_state)
        run.optimizer.load_state_dict(state.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise IncompatibleModelError(f"training state does not fit the model: {exc}") from exc
    run.scheduler.load_state_dict(state.scheduler_state)
    restore_rng(state.rng_state)
    run.start_epoch = state.epoch
    run.history = list(state.history)
    run.best_epoch, run.best_val_iou = state.best_epoch, state.best_val_iou
    run.best_state = state.best_model_state
    run.stale_epochs = state.stale_epochs
