"""Runs one job attempt with the training core: loads tiles from object storage, trains, writes
checkpoints and models, and reports every step as events on the run's log.

This is the adapter between segcore (pure) and the node: it translates observer hooks into
events, the cancel flag into `should_stop`, and core errors into a FAILED outcome whose reason
says what to change. In a data-parallel attempt every process runs it; the ranks agree on the
control flags at each batch, and only rank 0 writes checkpoints and models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import advice, checkpoint
from segcore.advice import AdviceDetector
from segcore.architectures import build_model, load_pretrained_backbone
from segcore.distributed import Group, PrimaryFailed
from segcore.errors import IncompatibleModelError, SegcoreError
from segcore.intensity import Normalization
from segcore.progress import EpochResult
from segcore.tiles import KnownMeasures
from segcore.training import TrainConfig, TrainingState, TrainResult, train
from services.common import hyperparameters as wire
from services.common import object_keys
from services.common.errors import DomainError
from services.common.settings import TrainerSettings
from services.common.storage import ObjectStore, ObjectTooLargeError
from services.common.timeutil import to_duration
from services.trainer_svc.runs import JobRun
from services.trainer_svc.tile_source import DiskCache, PatientStore, StoredTiles, known_measures

log = logging.getLogger(__name__)
S = common_pb2
T = TypeVar("T")
MAX_PRETRAINED_BYTES = 4 * 2**30  # an uploaded backbone's weights (ConvNeXt-XL is 1.4 GB in float32)
WARM_THREADS = 8  # objects fetched at once into the disk cache before training (I/O: the GIL is free)


_ADVICE_KINDS = {
    advice.OVERFITTING: S.Advice.KIND_OVERFITTING,
    advice.GENERALISATION_GAP: S.Advice.KIND_GENERALISATION_GAP,
    advice.PLATEAU: S.Advice.KIND_PLATEAU,
    advice.DEGENERATE: S.Advice.KIND_DEGENERATE,
}


class _Reporter:
    """The training observer: turns hooks into events (batch progress throttled)."""

    def __init__(self, run: JobRun, epochs: int, progress_interval_s: float, class_names: list[str],
                 group: Group) -> None:
        self._run = run
        self._group = group
        self._class_names = class_names
        self._epochs = epochs
        self._interval = progress_interval_s
        self._started = time.monotonic()
        self._last_batch_event = 0.0
        self._batches = 1
        self._history: list[EpochResult] = []
        self._advisor = AdviceDetector(class_names=class_names)

    def progress(self, epoch: int, batch: int, phase: int) -> common_pb2.Progress:
        done = ((epoch - 1) + batch / self._batches) / self._epochs if epoch else 0.0
        elapsed = time.monotonic() - self._started
        p = common_pb2.Progress(percent=round(100 * done, 2), epoch=epoch, epochs=self._epochs, batch=batch,
                                batches=self._batches, elapsed=to_duration(elapsed), phase=phase)  # type: ignore[arg-type]
        if done > 0.01:
            p.eta.CopyFrom(to_duration(elapsed / done - elapsed))
        return p

    def phase_after_epoch(self, phase: int, epoch: int) -> None:
        self.phase(phase, epoch, self._batches)

    def phase(self, phase: int, epoch: int = 0, batch: int = 0) -> None:
        self._run.emit(S.JobEvent(phase_change=S.PhaseChange(phase=phase),  # type: ignore[arg-type]
                                  progress=self.progress(epoch, batch, phase)))

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None:
        self._batches = num_batches
        self.phase(S.PHASE_TRAINING, epoch, 0)

    def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None:
        now = time.monotonic()
        if batch == num_batches:
            self.phase(S.PHASE_VALIDATING, epoch, batch)
        elif now - self._last_batch_event >= self._interval:
            self._last_batch_event = now
            self._run.emit(S.JobEvent(
                batch_progress=S.BatchProgress(epoch=epoch, batch=batch, batches=num_batches, loss=loss),
                progress=self.progress(epoch, batch, S.PHASE_TRAINING)))

    def on_epoch_end(self, result: EpochResult) -> None:
        self._run.emit(S.JobEvent(epoch_metrics=epoch_metrics(result, self._class_names),
                                  progress=self.progress(result.epoch, self._batches, S.PHASE_VALIDATING)))
        self._history.append(result)
        for found in self._advisor.update(self._history):
            self._run.emit(S.JobEvent(advice=S.Advice(kind=_ADVICE_KINDS[found.kind], message=found.message,
                                                      epoch=found.epoch)))

    def resume_history(self, history: list[EpochResult], *, relayed_up_to: int) -> None:
        """Epochs restored from a checkpoint count for advice. Those the job's log already has
        are not reported again; those beyond (`relayed_up_to` > 0: a stale attempt trained them
        into the file after the job moved on, and nobody relayed them) are, so the history keeps
        every epoch the resumed state holds, once."""
        self._history = list(history)
        unseen = [r for r in history if relayed_up_to and r.epoch > relayed_up_to]
        if unseen:
            self._run.emit(S.JobEvent(warning=S.Warning(code="CHECKPOINT_ADVANCED", message=(
                f"the checkpoint to resume from holds epochs {unseen[0].epoch}-{unseen[-1].epoch}, trained by an "
                f"earlier attempt after epoch {relayed_up_to} was relayed; they are reported now"))))
        for result in unseen:
            self._run.emit(S.JobEvent(epoch_metrics=epoch_metrics(result, self._class_names)))

    def should_stop(self) -> bool:
        """The run's control flags, agreed on by every rank: a cancel, stop early or hand back that
        reached any process (a node of a multi-node attempt hands back alone) stops them all at
        this batch, and rank 0 reports it as what it is."""
        run = self._run
        if self._group.parallel:
            cancel, stop_early, hand_back = self._group.agree([run.cancel_requested, run.stop_early, run.handing_back])
            run.cancel_requested, run.stop_early, run.handing_back = cancel, stop_early, hand_back
        return run.cancel_requested


def epoch_metrics(result: EpochResult, class_names: list[str]) -> common_pb2.EpochMetrics:
    return common_pb2.EpochMetrics(
        epoch=result.epoch, epochs=result.epochs, train_loss=result.train_loss, train_iou=result.train_iou,
        val_loss=result.val_loss, val_iou=result.val_iou, learning_rate=result.learning_rate,
        epoch_time=to_duration(result.seconds), is_best=result.is_best,
        per_class_iou=[S.ClassIoU(class_index=i, class_name=name, iou=iou) if iou is not None
                       else S.ClassIoU(class_index=i, class_name=name)
                       for i, (name, iou) in enumerate(zip(class_names, result.per_class_iou, strict=False))],
    )


def _seeded_model(config: TrainConfig, architecture: str) -> torch.nn.Module:
    """A fresh model whose random initialisation (e.g. a new head) is reproducible from the seed."""
    torch.manual_seed(config.seed)
    return build_model(architecture, config.num_classes)


def _record_initialisation(run: JobRun, how: str, code: str, message: str) -> None:
    run.initialisation = how
    run.emit(S.JobEvent(warning=S.Warning(code=code, message=message)))


def failure_of(job: str, exc: Exception) -> common_pb2.JobFinished:
    """A failed attempt's report. Out of memory and bad data or parameters say what to change
    (the pipeline does not retry a FAILED attempt: the same inputs would fail again); anything
    else is an internal error, logged under an incident id the reason carries."""
    where = _out_of_memory(exc)
    if where:
        log.warning("%s ran out of %s memory", job, where)
        return S.JobFinished(state=S.JOB_STATE_FAILED, reason=(
            f"out of {where} memory: lower the batch size, set a smaller crop size, or pick a smaller architecture"))
    if isinstance(exc, SegcoreError | DomainError):
        log.warning("%s failed: %s", job, exc)
        return S.JobFinished(state=S.JOB_STATE_FAILED, reason=str(exc))
    if isinstance(exc, PrimaryFailed):
        return S.JobFinished(state=S.JOB_STATE_FAILED, reason=f"rank 0 failed: {exc}")
    if _lost_peer(exc):
        log.warning("%s lost a process of its group: %s", job, exc)
        return S.JobFinished(state=S.JOB_STATE_QUEUED, reason=(
            f"a process of the job's group was lost ({type(exc).__name__}); the job is retried from its last "
            "checkpoint"))
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s)", job, incident, exc_info=exc)
    return S.JobFinished(state=S.JOB_STATE_FAILED, reason=f"internal error on the trainer node (incident {incident})")


# What gloo and NCCL say when another process of the group went away (not always a DistError).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "NCCL communicator")


def _lost_peer(exc: Exception) -> bool:
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_LOST))


def _out_of_memory(exc: Exception) -> str:
    """ "device" or "host" when `exc` is an allocation that failed, else "". torch's CPU allocator
    raises a plain RuntimeError; Python's own allocations raise MemoryError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "device"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
            "can't allocate memory" in str(exc) or "not enough memory" in str(exc))):
        return "host"
    return ""


@dataclass(frozen=True)
class PretrainedPolicy:
    """Where pretrained weights may come from besides uploads: `file:` paths under `roots` only
    (symbolic links resolved first), `hf:` hub ids only when `hub` is allowed."""

    roots: tuple[Path, ...] = ()
    hub: bool = False

    @classmethod
    def of(cls, settings: TrainerSettings) -> PretrainedPolicy:
        roots = tuple(Path(r).resolve() for r in settings.pretrained_roots.split(":") if r.strip())
        return cls(roots, settings.allow_hub)

    def file(self, source: str) -> Path:
        """The path of `file:` weights; one reason for every refusal, so that a caller learns
        nothing of which paths exist or can be read."""
        path = Path(source.removeprefix("file:")).resolve()
        if not any(path.is_relative_to(root) for root in self.roots) or not os.access(path, os.R_OK):
            raise IncompatibleModelError(
                f"pretrained weights {source!r} cannot be used: not under the folders this node allows "
                "(SEGTRAIN_TRAINER_PRETRAINED_ROOTS), or not readable there")
        return path

    def hub_id(self, source: str) -> str:
        if not self.hub:
            raise IncompatibleModelError(
                f"pretrained weights {source!r} come from the Hugging Face hub, which this node does not use "
                "(SEGTRAIN_TRAINER_ALLOW_HUB); upload the weights and name their key instead")
        return source.removeprefix("hf:")


class JobExecutor:
    def __init__(self, store: ObjectStore, *, device: str | None, num_threads: int | None,
                 progress_interval_s: float, storage_patience_s: float, data_workers: int = 0,
                 prepared_cache_mb: int = 256, tile_cache: DiskCache | None = None,
                 pretrained: PretrainedPolicy = PretrainedPolicy()) -> None:
        self._store = PatientStore(store, patience_s=storage_patience_s, cache=tile_cache)
        self._tile_cache = tile_cache
        self._pretrained = pretrained
        self._device = device
        self._num_threads = num_threads
        self._data_workers = data_workers
        self._prepared_cache_mb = prepared_cache_mb
        self._progress_interval_s = progress_interval_s

    def execute(self, run: JobRun, request: trainer_pb2.RunJobRequest) -> None:
        """Runs the attempt to its end; always finishes the run's log with a `finished` event."""
        try:
            finished = self._train(run, request, self._config(request))
        except Exception as exc:  # every failure ends the attempt; failure_of says what to change
            finished = failure_of(request.job, exc)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the device's memory goes back with the worker
        run.emit(S.JobEvent(finished=finished))

    def _train(self, run: JobRun, request: trainer_pb2.RunJobRequest, config: TrainConfig) -> common_pb2.JobFinished:
        group = Group.current()
        reporter = _Reporter(run, config.epochs, self._progress_interval_s, config.class_names, group)
        reporter.phase(S.PHASE_PREPARING_DATA)
        train_tiles = [t for t in request.tiles if not t.validation]
        val_tiles = [t for t in request.tiles if t.validation]
        train_samples, val_samples = StoredTiles(train_tiles, self._store), StoredTiles(val_tiles, self._store)
        known = _known_measures(train_tiles, val_tiles, config.num_classes)
        if known is not None:
            # Not overlapped with the loaders' start-up: on 2 cores that made the fetch 2x slower.
            self._warm_cache(run, request)
        reporter.phase(S.PHASE_RENDERING_MASKS)
        resume = self._resume_state(request)
        if resume is not None:
            reporter.resume_history(resume.history, relayed_up_to=request.resume_checkpoint_epoch)
        model, normalization = self._initial_model(run, request, config) if resume is None else (None, None)
        result = train(config, train_samples, val_samples, reporter, init_state=resume, model=model,
                       normalization=normalization,
                       checkpoint=lambda state: self._checkpoint(run, request, reporter, state), group=group,
                       known=known)
        if not group.primary:
            return S.JobFinished(state=S.JOB_STATE_SUCCEEDED, epochs_trained=len(result.history),
                                 reason=f"rank {group.rank} of {group.world_size} trained its share; rank 0 reports")
        return self._finish(run, request, config, result, reporter)

    def _config(self, request: trainer_pb2.RunJobRequest) -> TrainConfig:
        # Unset fields take the contract's defaults, inside TrainConfig: no fallbacks of our own.
        values = wire.values_of(request.hyperparameters)
        return TrainConfig(class_names=list(request.class_names), device=self._device, num_threads=self._num_threads,
                           data_workers=self._data_workers, prepared_cache_mb=self._prepared_cache_mb,
                           **values)  # type: ignore[arg-type]

    def _warm_cache(self, run: JobRun, request: trainer_pb2.RunJobRequest) -> None:
        """Fetches the set into the node's disk cache before training when it fits: the first epoch's
        loaders then read the disk instead of fetching while the model trains beside them, which on
        a node with few cores slows both (bench/scale.py). A set larger than the cache streams from
        the store every epoch, so fetching it first would gain nothing. Each process of the node
        fetches its share. A set prepared before measures were recorded needs none: its checking
        pass reads every tile through the cache."""
        cache = self._tile_cache
        if cache is None or sum(t.measures.stored_bytes for t in request.tiles) > cache.max_bytes:
            return
        local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        started = time.monotonic()
        fetched = self._store.warm(request.tiles[local_rank::local_size], threads=WARM_THREADS,
                                   stop=lambda: run.cancel_requested)
        log.info("fetched %d tile objects into the disk cache in %.1f s", fetched, time.monotonic() - started)

    def _initial_model(self, run: JobRun, request: trainer_pb2.RunJobRequest, config: TrainConfig
                       ) -> tuple[torch.nn.Module | None, Normalization | None]:
        """The parent model to fine-tune (its head re-initialised when the class map differs) with
        the parent's normalization when the job uses the same mode, or a fresh model with
        pretrained backbone weights, or (None, None) for a fresh model."""
        if request.pretrained_weights:
            return self._pretrained_model(run, request, config), None
        if not request.HasField("from_model"):
            return None, None
        parent, meta = checkpoint.load_model(self._store.get_model(request.from_model))
        inherited = Normalization.from_dict(meta.normalization)
        normalization = inherited if inherited.mode == config.normalization else None
        return self._fine_tuned(run, request, config, parent, meta), normalization

    def _fine_tuned(self, run: JobRun, request: trainer_pb2.RunJobRequest, config: TrainConfig,
                    parent: torch.nn.Module, meta: checkpoint.ModelMeta) -> torch.nn.Module:
        if meta.class_names == list(request.class_names):
            run.initialisation = f"{request.from_model.name}: all weights"
            return parent
        model = _seeded_model(config, meta.architecture)
        own = model.state_dict()
        kept = {k: v for k, v in parent.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(kept, strict=False)
        _record_initialisation(
            run, f"{request.from_model.name}: backbone kept, head re-initialised (class map differs)",
            "HEAD_REINITIALISED", f"the parent's classes {meta.class_names} differ from this set's "
            f"{list(request.class_names)}: backbone kept, {len(own) - len(kept)} head tensors re-initialised")
        return model

    def _pretrained_model(self, run: JobRun, request: trainer_pb2.RunJobRequest, config: TrainConfig
                          ) -> torch.nn.Module:
        source = request.pretrained_weights
        try:
            if source.startswith("file:"):
                weights: str | bytes = str(self._pretrained.file(source))
            elif source.startswith("hf:"):
                from huggingface_hub import snapshot_download

                # The model's files only, not every file of the repository.
                weights = snapshot_download(self._pretrained.hub_id(source),  # honours HF_HUB_OFFLINE
                                            allow_patterns=["*.json", "*.safetensors"])
            else:
                weights = self._store.get(source, max_bytes=MAX_PRETRAINED_BYTES)
        except IncompatibleModelError:
            raise  # the policy's own refusal (a ValueError too)
        except ObjectTooLargeError as exc:
            raise IncompatibleModelError(f"pretrained weights {source!r}: the object {exc.message}") from None
        except (OSError, ValueError) as exc:  # hub unreachable/unknown id
            reason = f"could not read pretrained weights {source!r}: {type(exc).__name__}"
            raise IncompatibleModelError(reason) from None
        model = _seeded_model(config, config.architecture)
        report = load_pretrained_backbone(model, weights)
        _record_initialisation(
            run, f"pretrained backbone {source}", "PRETRAINED_LOADED",
            f"{len(report.loaded)} pretrained backbone tensors loaded from {source}; "
            f"{len(report.missing)} backbone tensors kept their initialisation")
        return model

    def _resume_state(self, request: trainer_pb2.RunJobRequest) -> TrainingState | None:
        if not request.resume_checkpoint_uri:
            return None
        return checkpoint.load_training_state(self._store.get(request.resume_checkpoint_uri))

    def _checkpoint(self, run: JobRun, request: trainer_pb2.RunJobRequest, reporter: _Reporter,
                    state: TrainingState) -> None:
        reporter.phase_after_epoch(S.PHASE_CHECKPOINTING, state.epoch)
        data = checkpoint.save_training_state(state)
        # One rolling full-state checkpoint: resume needs only the latest (no per-epoch bloat).
        key = object_keys.state_checkpoint(request.output_prefix)
        self._store.put(key, data)
        run.emit(S.JobEvent(checkpoint_saved=S.CheckpointSaved(epoch=state.epoch, uri=key, size_bytes=len(data),
                                                                kind="state")))

    def _finish(self, run: JobRun, request: trainer_pb2.RunJobRequest, config: TrainConfig,
                result: TrainResult, reporter: _Reporter) -> common_pb2.JobFinished:
        if result.stopped and run.handing_back:
            return S.JobFinished(state=S.JOB_STATE_QUEUED, epochs_trained=len(result.history), reason=(
                "a trainer node of the job shut down (or lost its worker) and handed the job back; it resumes "
                "from its last checkpoint"))
        if result.stopped and not run.stop_early:
            return S.JobFinished(state=S.JOB_STATE_CANCELLED, reason="cancelled by request",
                                 epochs_trained=len(result.history))
        if result.best_state is None or result.best_epoch is None:
            return S.JobFinished(state=S.JOB_STATE_FAILED, reason="no epoch completed; nothing to register")
        reporter.phase_after_epoch(S.PHASE_FINALISING, result.history[-1].epoch)
        meta = checkpoint.model_meta_for(config, result, tile_size=request.tile_size, extra={
            "job": request.job, "training_set": request.training_set,
            "training_set_snapshot": request.training_set_snapshot})
        best = self._put_model(object_keys.model_weights(request.output_prefix, "best"), result.best_state, meta)
        final = self._put_model(object_keys.model_weights(request.output_prefix, "final"), result.final_state, meta)
        best_result = next(r for r in result.history if r.epoch == result.best_epoch)
        why = f"highest validation IoU ({best_result.val_iou:.4f}) of {len(result.history)} epochs"
        if result.stopped:
            why += "; training was stopped early on request"
        elif result.early_stopped:
            why += f"; early stopping after {config.early_stopping_patience} epochs without improvement"
        environment = {**meta.versions, "seed": str(config.seed), "device": meta.device,
                       "initialisation": run.initialisation, "processes": str(Group.current().world_size)}
        warnings = [S.QualityWarning(code=i.code, class_name=i.class_name, message=i.message)
                    for i in advice.quality_issues(best_result, config.class_names)]
        for w in warnings:
            run.emit(S.JobEvent(warning=S.Warning(code=w.code, message=w.message)))
        return S.JobFinished(
            state=S.JOB_STATE_SUCCEEDED, best_model=best, final_model=final, best_epoch=result.best_epoch,
            best_metrics=epoch_metrics(best_result, list(request.class_names)), selection_reason=why,
            epochs_trained=len(result.history), environment=environment, quality_warnings=warnings,
            normalization=result.normalization.describe(),
        )

    def _put_model(self, key: str, state: dict, meta: checkpoint.ModelMeta) -> common_pb2.Artifact:  # type: ignore[type-arg]
        data = checkpoint.export_model(state, meta)
        self._store.put(key, data)
        return S.Artifact(uri=key, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _known_measures(train_tiles: list[trainer_pb2.TrainingTile], val_tiles: list[trainer_pb2.TrainingTile],
                    num_classes: int) -> tuple[KnownMeasures, KnownMeasures] | None:
    """What the set's preparation measured of both splits (None unless it measured every tile)."""
    train_known, val_known = known_measures(train_tiles, num_classes), known_measures(val_tiles, num_classes)
    return None if train_known is None or val_known is None else (train_known, val_known)
