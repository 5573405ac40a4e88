"""A trainer node's job execution against real S3: phases and events, checkpoints and models in
storage, advice, fine-tuning a parent across class maps, resuming from a checkpoint, cancel."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save as save_safetensors
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import advice as advice_module
from segcore import synthetic
from segcore.architectures import build_model
from services.common import object_keys
from services.common.errors import CancelledError, FailedPreconditionError, UnavailableError
from services.common.storage import ObjectStore
from services.trainer_svc.analysis import Analyzer
from services.trainer_svc.executor import JobExecutor, PretrainedPolicy
from services.trainer_svc.runs import JobRun
from tests.helpers import png_bytes

S = common_pb2
QUALITY_CODES = {advice_module.PREDICTIONS_COLLAPSED, advice_module.CLASS_NOT_LEARNED}


@pytest.fixture(scope="module")
def tiles(store: ObjectStore) -> list[trainer_pb2.TrainingTile]:
    prefix = f"training-sets/{uuid.uuid4().hex}/"
    result = []
    for i, tile in enumerate(synthetic.generate_tiles(10, tile_size=64, seed=11)):
        store.put(f"{prefix}images/{tile.name}.png", png_bytes(tile.image))
        store.put(f"{prefix}masks/{tile.name}.png", png_bytes(tile.mask))
        result.append(trainer_pb2.TrainingTile(name=tile.name, image_uri=f"{prefix}images/{tile.name}.png",
                                               mask_uri=f"{prefix}masks/{tile.name}.png", validation=i >= 8))
    return result


def request(tiles: list[trainer_pb2.TrainingTile], *, epochs: int = 2, classes: list[str] | None = None,
            **kw: object) -> trainer_pb2.RunJobRequest:
    job = f"j-{uuid.uuid4().hex[:8]}"
    return trainer_pb2.RunJobRequest(
        job=f"jobs/{job}", attempt=1, class_names=classes or synthetic.CLASS_NAMES, tile_size=64, tiles=tiles,
        output_prefix=object_keys.attempt_prefix(job, 1), hyperparameters=S.Hyperparameters(
            architecture="upernet-convnext-cpu", epochs=epochs, batch_size=4, learning_rate=0.003, seed=0,
            weight_decay=0.01, augment=True, loss="ce+dice", checkpoint_every=1), **kw)


def executor(store: ObjectStore, *, storage_patience_s: float = 30.0,
             pretrained: PretrainedPolicy | None = None) -> JobExecutor:
    return JobExecutor(store, device="cpu", num_threads=1, progress_interval_s=0.0,
                       storage_patience_s=storage_patience_s, pretrained=pretrained or PretrainedPolicy())


def execute(store: ObjectStore, req: trainer_pb2.RunJobRequest,
            pretrained: PretrainedPolicy | None = None) -> JobRun:
    run = JobRun(job=req.job, attempt=req.attempt)
    executor(store, pretrained=pretrained).execute(run, req)
    return run


def kinds(run: JobRun, kind: str) -> list:  # type: ignore[type-arg]
    return [getattr(e, kind) for e in run.events if e.HasField(kind)]


def test_a_job_reports_phases_epochs_checkpoints_and_its_models(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    run = execute(store, request(tiles))
    assert [e.source_seq for e in run.events] == list(range(1, len(run.events) + 1))
    phases = [p.phase for p in kinds(run, "phase_change")]
    assert phases[:3] == [S.PHASE_PREPARING_DATA, S.PHASE_RENDERING_MASKS, S.PHASE_TRAINING]
    assert {S.PHASE_VALIDATING, S.PHASE_CHECKPOINTING, S.PHASE_FINALISING} <= set(phases)
    epochs = kinds(run, "epoch_metrics")
    assert [m.epoch for m in epochs] == [1, 2]
    assert all(len(m.per_class_iou) == 3 and m.learning_rate > 0 and m.epoch_time.ToTimedelta().total_seconds() > 0
               for m in epochs)
    assert kinds(run, "batch_progress"), "batch progress is reported within epochs"
    progress = [e.progress.percent for e in run.events if e.HasField("progress")]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(100, abs=1)
    checkpoints = kinds(run, "checkpoint_saved")
    assert [c.epoch for c in checkpoints] == [1, 2] and len({c.uri for c in checkpoints}) == 1  # one rolling file
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_SUCCEEDED and finished.epochs_trained == 2
    best = max(epochs, key=lambda m: m.val_iou)
    assert finished.best_epoch == best.epoch and "validation IoU" in finished.selection_reason
    for artifact in (finished.best_model, finished.final_model):
        data = store.get(artifact.uri)
        assert len(data) == artifact.size_bytes and hashlib.sha256(data).hexdigest() == artifact.sha256
    assert finished.environment["seed"] == "0" and finished.environment["device"] == "cpu"


def test_a_short_object_store_outage_delays_the_job_but_does_not_fail_it(
    store: ObjectStore, tiles: list, monkeypatch: pytest.MonkeyPatch  # type: ignore[type-arg]
) -> None:
    real_put, real_get = store.put, store.get
    failures = {"put": 3, "get": 2}

    def flaky(kind: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            if failures[kind] > 0:
                failures[kind] -= 1
                raise UnavailableError("object store unreachable")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(store, "put", flaky("put", real_put))
    monkeypatch.setattr(store, "get", flaky("get", real_get))
    run = execute(store, request(tiles, epochs=1))
    assert run.events[-1].finished.state == S.JOB_STATE_SUCCEEDED
    assert failures == {"put": 0, "get": 0}


def test_a_long_outage_fails_the_job_saying_so(store: ObjectStore, tiles: list,  # type: ignore[type-arg]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_: object, **__: object) -> bytes:
        raise UnavailableError("object store unreachable")

    monkeypatch.setattr(store, "get", down)
    req = request(tiles, epochs=1)
    run = JobRun(job=req.job, attempt=1)
    executor(store, storage_patience_s=0.5).execute(run, req)
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_FAILED and "object store unreachable" in finished.reason


def test_a_node_shutting_down_hands_the_job_back(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    req = request(tiles, epochs=200)
    run = JobRun(job=req.job, attempt=1)

    def shut_down_after_first_epoch() -> None:
        while not kinds(run, "checkpoint_saved"):
            threading.Event().wait(0.005)
        run.hand_back()

    threading.Thread(target=shut_down_after_first_epoch, daemon=True).start()
    executor(store).execute(run, req)
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_QUEUED and "handed the job back" in finished.reason
    assert run.wait_finished(0)


def test_advice_from_the_detector_becomes_events(store: ObjectStore, tiles: list,  # type: ignore[type-arg]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def always(self: advice_module.AdviceDetector, history: list) -> list:  # type: ignore[type-arg]
        return [advice_module.Advice(advice_module.PLATEAU, history[-1].epoch, "stalled")] if len(history) == 2 else []

    monkeypatch.setattr(advice_module.AdviceDetector, "update", always)
    run = execute(store, request(tiles))
    assert [(a.kind, a.epoch, a.message) for a in kinds(run, "advice")] == [(S.Advice.KIND_PLATEAU, 2, "stalled")]


def test_fine_tuning_a_parent_with_another_class_map_keeps_the_backbone(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    parent = execute(store, request(tiles, epochs=1)).events[-1].finished
    child = request(tiles, epochs=1, classes=["background", "cell", "debris", "other"], from_model=trainer_pb2.ModelRef(
        name="models/m-parent", weights_uri=parent.best_model.uri, weights_sha256=parent.best_model.sha256,
        architecture="upernet-convnext-cpu",
        class_names=synthetic.CLASS_NAMES))
    run = execute(store, child)
    # One epoch on ten tiles also leaves classes unlearned: those are quality warnings, not this one's.
    warnings = [w for w in kinds(run, "warning") if w.code not in QUALITY_CODES]
    assert [w.code for w in warnings] == ["HEAD_REINITIALISED"] and "backbone kept" in warnings[0].message
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_SUCCEEDED
    assert finished.environment["initialisation"] == "models/m-parent: backbone kept, head re-initialised " \
                                                     "(class map differs)"


def test_pretrained_backbone_weights_from_storage_and_from_a_directory(store: ObjectStore, tiles: list,  # type: ignore[type-arg]
                                                                      tmp_path: Path) -> None:
    donor = build_model("upernet-convnext-cpu", 5)
    key = f"uploads/{uuid.uuid4().hex}/backbone.safetensors"
    store.put(key, save_safetensors({k: v.contiguous() for k, v in donor.backbone.state_dict().items()}))
    donor.backbone.save_pretrained(tmp_path / "allowed" / "backbone")
    policy = PretrainedPolicy(roots=((tmp_path / "allowed").resolve(),), hub=True)
    for source in (key, f"file:{tmp_path / 'allowed' / 'backbone'}"):
        run = execute(store, request(tiles, epochs=1, pretrained_weights=source), policy)
        warnings = [w for w in kinds(run, "warning") if w.code not in QUALITY_CODES]
        assert [w.code for w in warnings] == ["PRETRAINED_LOADED"], source
        assert run.events[-1].finished.state == S.JOB_STATE_SUCCEEDED
    missing = execute(store, request(tiles, epochs=1, pretrained_weights="hf:nobody/no-such-model"), policy)
    finished = missing.events[-1].finished
    assert finished.state == S.JOB_STATE_FAILED and "nobody/no-such-model" in finished.reason


def test_file_weights_outside_the_allowed_folders_fail_without_telling_what_exists(
        store: ObjectStore, tiles: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "escape").symlink_to("/etc")  # a link out of the folder does not count
    policy = PretrainedPolicy(roots=((tmp_path / "allowed").resolve(),))
    reasons = set()
    for path in ("/etc/passwd", "/etc/no-such-file", "/root/.ssh/id_rsa", f"{tmp_path}/allowed/../../x",
                 f"{tmp_path}/allowed/escape/passwd", f"{tmp_path}/allowed/missing"):
        source = f"file:{path}"
        finished = execute(store, request(tiles, epochs=1, pretrained_weights=source), policy).events[-1].finished
        assert finished.state == S.JOB_STATE_FAILED
        reasons.add(finished.reason.replace(source, "SOURCE"))
    assert len(reasons) == 1, reasons  # one reason whether the file exists, is readable or not
    assert "SEGTRAIN_TRAINER_PRETRAINED_ROOTS" in reasons.pop()
    hub = execute(store, request(tiles, epochs=1, pretrained_weights="hf:org/model")).events[-1].finished
    assert hub.state == S.JOB_STATE_FAILED and "SEGTRAIN_TRAINER_ALLOW_HUB" in hub.reason


def test_resuming_from_a_checkpoint_continues_after_its_epoch(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    first = request(tiles, epochs=3)
    first_run = JobRun(job=first.job, attempt=1)
    same_node = executor(store)

    def stop_after_epoch_two() -> None:  # the node dies after epoch 2's checkpoint
        while len(kinds(first_run, "checkpoint_saved")) < 2:
            threading.Event().wait(0.01)
        first_run.request_cancel(False)

    threading.Thread(target=stop_after_epoch_two, daemon=True).start()
    same_node.execute(first_run, first)
    checkpoint = kinds(first_run, "checkpoint_saved")[-1]
    assert checkpoint.epoch == 2
    second = trainer_pb2.RunJobRequest()
    second.CopyFrom(first)
    second.attempt, second.resume_checkpoint_uri, second.resume_checkpoint_epoch = 2, checkpoint.uri, 2
    second.output_prefix = object_keys.attempt_prefix(second.job.removeprefix("jobs/"), 2)
    resumed = execute(store, second)
    assert [m.epoch for m in kinds(resumed, "epoch_metrics")] == [3]
    assert resumed.events[-1].finished.state == S.JOB_STATE_SUCCEEDED
    uninterrupted = execute(store, request(tiles, epochs=3))
    a, b = kinds(resumed, "epoch_metrics")[0], kinds(uninterrupted, "epoch_metrics")[2]
    assert (a.train_loss, a.val_loss, a.val_iou) == (b.train_loss, b.val_loss, b.val_iou)

    # Only epoch 1's checkpoint was relayed; the file holds epoch 2 (an attempt that outlived its
    # lease trained on): the resumed attempt reports epoch 2 from the file, so none is missing.
    third = trainer_pb2.RunJobRequest()
    third.CopyFrom(second)
    third.attempt, third.resume_checkpoint_epoch = 3, 1
    third.output_prefix = object_keys.attempt_prefix(third.job.removeprefix("jobs/"), 3)
    advanced = execute(store, third)
    assert [m.epoch for m in kinds(advanced, "epoch_metrics")] == [2, 3]
    assert "CHECKPOINT_ADVANCED" in [w.code for w in kinds(advanced, "warning")]
    from_file, trained = kinds(advanced, "epoch_metrics")[0], kinds(first_run, "epoch_metrics")[1]
    assert (from_file.train_loss, from_file.val_iou) == (trained.train_loss, trained.val_iou)


def test_cancel_stops_within_a_batch_and_registers_nothing(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    req = request(tiles, epochs=200)
    run = JobRun(job=req.job, attempt=1)

    def cancel_on_first_batch() -> None:
        while not kinds(run, "batch_progress"):
            threading.Event().wait(0.005)
        run.request_cancel(False)

    threading.Thread(target=cancel_on_first_batch, daemon=True).start()
    executor(store).execute(run, req)
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_CANCELLED and not finished.best_model.uri
    assert len(kinds(run, "epoch_metrics")) <= 1


def test_stop_early_keeps_and_returns_the_best_model(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    req = request(tiles, epochs=200)
    run = JobRun(job=req.job, attempt=1)

    def stop_after_two_epochs() -> None:
        while len(kinds(run, "epoch_metrics")) < 2:
            threading.Event().wait(0.005)
        run.request_cancel(True)

    threading.Thread(target=stop_after_two_epochs, daemon=True).start()
    executor(store).execute(run, req)
    finished = run.events[-1].finished
    assert finished.state == S.JOB_STATE_SUCCEEDED and store.exists(finished.best_model.uri)
    assert "stopped early" in finished.selection_reason and finished.epochs_trained >= 2


def test_attempts_write_apart_and_a_changed_model_is_never_loaded(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    """Two attempts of one job keep their own files; weights replaced in storage after their hash
    was recorded are refused as a parent (the job fails saying so) and for analysis."""
    first = request(tiles, epochs=1)
    second = trainer_pb2.RunJobRequest()
    second.CopyFrom(first)
    second.attempt, second.output_prefix = 2, object_keys.attempt_prefix(first.job.removeprefix("jobs/"), 2)
    a, b = execute(store, first).events[-1].finished, execute(store, second).events[-1].finished
    assert a.best_model.uri != b.best_model.uri and store.exists(a.best_model.uri) and store.exists(b.best_model.uri)

    weights = store.get(a.best_model.uri)  # someone changes one weight of the registered file (the last
    store.put(a.best_model.uri, weights[:-1] + bytes([weights[-1] ^ 1]))  # bytes are tensor data: it still loads
    ref = trainer_pb2.ModelRef(name="models/m-a", weights_uri=a.best_model.uri, weights_sha256=a.best_model.sha256,
                               architecture="upernet-convnext-cpu", class_names=synthetic.CLASS_NAMES)
    child = execute(store, request(tiles, epochs=1, from_model=ref)).events[-1].finished
    assert child.state == S.JOB_STATE_FAILED and "does not match the sha256" in child.reason
    analysis = trainer_pb2.AnalyzeTilesRequest(model=ref, image_keys=[tiles[0].image_uri],
                                               output_prefix=object_keys.analysis_prefix("a-tampered"))
    with pytest.raises(FailedPreconditionError, match="does not match the sha256"):
        Analyzer(store, "cpu", 1).analyze(analysis)
    assert not store.list_keys(object_keys.analysis_prefix("a-tampered"))


def test_an_analysis_whose_caller_gives_up_stops_and_leaves_no_masks(store: ObjectStore, tiles: list) -> None:  # type: ignore[type-arg]
    finished = execute(store, request(tiles, epochs=1)).events[-1].finished
    ref = trainer_pb2.ModelRef(name="models/m-a", weights_uri=finished.best_model.uri,
                               weights_sha256=finished.best_model.sha256, architecture="upernet-convnext-cpu",
                               class_names=synthetic.CLASS_NAMES)
    keys = [t.image_uri for t in tiles] * 3  # several batches of 8
    analysis = trainer_pb2.AnalyzeTilesRequest(model=ref, image_keys=keys,
                                               output_prefix=object_keys.analysis_prefix("a-abandoned"))
    asked = []

    def wanted_for_one_batch() -> bool:
        asked.append(1)
        return len(asked) == 1

    with pytest.raises(CancelledError, match="gave up"):
        Analyzer(store, "cpu", 1).analyze(analysis, wanted_for_one_batch)
    assert len(asked) == 2  # it stopped at the next batch
    assert not store.list_keys(object_keys.analysis_prefix("a-abandoned"))
