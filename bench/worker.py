"""Measurements that run in their own process, started by bench/run.py.

Each sub-command prints one JSON object on its last stdout line. Running them as separate
processes gives every side of a comparison a fresh interpreter with its own torch thread setting,
and keeps torch out of the orchestrating process (which also hosts the latency watcher).

    echo '{...}' | python bench/worker.py bare-train   # bare PyTorch training loop
    echo '{...}' | python bench/worker.py core-train   # segcore.training.train(), no services
    echo '{...}' | python bench/worker.py core-parts   # segcore's per-epoch extras, timed apart
    echo '{...}' | python bench/worker.py datapath     # object storage -> augmented batches
    echo '{...}' | python bench/worker.py bare-infer   # bare forward pass of a model file
    echo '{...}' | python bench/worker.py watchers     # N concurrent WatchJobEvents streams
    python bench/worker.py serve                       # {"command": ..., "spec": ...} per line

The parameters (one JSON line) come on stdin, not argv, because they may carry the S3 secret.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from segcore.data import Sample
    from services.common.storage import ObjectStore

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "gen"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def _set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _samples(spec: dict[str, Any], key: str = "train_names") -> list[Any]:
    """The benchmark's tiles of one split, as segcore Samples (the same pixels the trainer node
    decodes from the set's PNGs)."""
    import numpy as np

    from segcore.data import Sample
    from segcore.synthetic import generate_tiles

    tiles = {t.name: t for t in generate_tiles(spec["tiles"], tile_size=spec["tile_size"], seed=spec["seed"])}
    return [Sample(n, tiles[n].image.astype(np.float32) / 255.0, tiles[n].mask.astype(np.int64))
            for n in spec[key]]


class _StageTimes:
    """Seconds per named stage, one entry per measurement; reported as the median in ms."""

    def __init__(self, *stages: str) -> None:
        self.seconds: dict[str, list[float]] = {stage: [] for stage in stages}

    def add(self, *values: float) -> None:
        """One measurement of every stage, in the order the stages were named."""
        for stage, value in zip(self.seconds, values, strict=True):
            self.seconds[stage].append(value)

    def median_ms(self) -> dict[str, float]:
        return {stage: 1000 * statistics.median(v) for stage, v in self.seconds.items()}


def _object_store(spec: dict[str, Any]) -> ObjectStore:
    """The stack's object store, from the S3 endpoint and credentials in the spec."""
    from pydantic import SecretStr

    from services.common.settings import StorageSettings
    from services.common.storage import ObjectStore

    return ObjectStore(StorageSettings(endpoint=spec["s3_endpoint"], access_key=spec["access_key"],
                                       secret_key=SecretStr(spec["secret_key"])))


# ----------------------------------------------------------------------------- bare training


def bare_train(spec: dict[str, Any]) -> dict[str, Any]:
    """forward + CE loss + backward + AdamW step over pre-built in-memory batches.

    The batches have the same sizes as the trainer's (segcore.data.plan_batches, which merges a
    last batch of one into the previous batch); one "epoch" is one pass over them.
    """
    import torch
    import torch.nn.functional as F

    from segcore.architectures import build_model
    from segcore.data import plan_batches
    from segcore.imaging import compute_normalization
    from segcore.inference import normalize

    threads = _set_threads(spec["threads"])
    samples = _samples(spec)
    norm = compute_normalization(s.image for s in samples)
    images = [normalize(s.image, norm) for s in samples]
    masks = [torch.from_numpy(s.mask) for s in samples]
    plan = plan_batches(len(samples), spec["batch_size"], None)
    batches = [(torch.stack([images[i] for i in b]), torch.stack([masks[i] for i in b])) for b in plan]
    torch.manual_seed(spec.get("model_seed", 0))
    model = build_model(spec["architecture"], spec["num_classes"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"], weight_decay=spec["weight_decay"])
    epoch_s, epoch_cpu_s = [], []
    for _ in range(spec["epochs"]):
        started, cpu_started = time.perf_counter(), time.process_time()
        for x, y in batches:
            logits = model(pixel_values=x).logits
            if logits.shape[-2:] != y.shape[-2:]:
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - started)
        epoch_cpu_s.append(time.process_time() - cpu_started)
    return {"threads": threads, "tiles": len(samples), "batches": [len(b) for b in plan], "epoch_s": epoch_s,
            "epoch_cpu_s": epoch_cpu_s}


def core_train(spec: dict[str, Any]) -> dict[str, Any]:
    """segcore.training.train() in-process with the job's configuration and no services: the same
    window as the node's events (epoch start -> end of the last training batch)."""
    from segcore.progress import NullObserver
    from segcore.training import TrainConfig, train

    class Timer(NullObserver):
        def __init__(self) -> None:
            self.starts: dict[int, tuple[float, float]] = {}
            self.epoch_s: list[float] = []
            self.epoch_cpu_s: list[float] = []

        def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None:
            self.starts[epoch] = (time.perf_counter(), time.process_time())

        def on_batch_end(self, epoch: int, batch: int, num_batches: int, loss: float) -> None:
            if batch == num_batches:
                self.epoch_s.append(time.perf_counter() - self.starts[epoch][0])
                self.epoch_cpu_s.append(time.process_time() - self.starts[epoch][1])

    threads = _set_threads(spec["threads"])
    config = TrainConfig(class_names=spec["class_names"], architecture=spec["architecture"],
                         batch_size=spec["batch_size"], epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                         weight_decay=spec["weight_decay"], seed=0, augment=True, loss="ce", device="cpu",
                         num_threads=spec["threads"])
    timer = Timer()
    train_samples = _samples(spec)
    train(config, train_samples, _samples(spec, "val_names"), timer)
    return {"threads": threads, "tiles": len(train_samples), "epoch_s": timer.epoch_s,
            "epoch_cpu_s": timer.epoch_cpu_s}


def core_parts(spec: dict[str, Any]) -> dict[str, Any]:
    """What segcore.train() does per epoch beyond the bare loop, each piece timed on its own on the
    benchmark's data (ms per epoch, median of `repeats`): building augmented batches
    (make_batch), the masked loss (segmentation_loss "ce", forward + backward) minus
    F.cross_entropy, and the per-batch IoU bookkeeping (argmax + ConfusionMatrix.update)."""
    threads = _set_threads(spec["threads"])
    parts = _core_extras(spec)
    times = _StageTimes(*parts)
    for fn in parts.values():
        fn()  # warm-up
    for _ in range(spec.get("repeats", 7)):
        for name, fn in parts.items():
            started = time.perf_counter()
            fn()
            times.seconds[name].append(time.perf_counter() - started)
    ms = times.median_ms()
    return {"threads": threads, "ms_per_epoch": {"augment_batch": ms["augment_batch"],
                                                 "masked_loss_extra": ms["masked_loss"] - ms["plain_loss"],
                                                 "iou_bookkeeping": ms["iou"]}}


def _core_extras(spec: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """One epoch of each of segcore's extras (and of the plain loss they are compared with) on the
    benchmark's augmented batches, with random logits standing in for the model's output."""
    import torch
    import torch.nn.functional as F

    from segcore.data import make_batch, plan_batches, prepare_samples
    from segcore.imaging import compute_normalization
    from segcore.losses import segmentation_loss
    from segcore.metrics import IGNORE_INDEX, ConfusionMatrix, argmax_classes

    samples = _samples(spec)
    norm = compute_normalization(s.image for s in samples)
    prepared = prepare_samples(samples, norm, spec["num_classes"], IGNORE_INDEX, field="samples")
    generator = torch.Generator().manual_seed(0)
    plan = plan_batches(len(prepared), spec["batch_size"], generator)
    batches = [make_batch(prepared, b, generator=generator, crop_size=None, augment_data=True,
                          ignore_index=IGNORE_INDEX) for b in plan]
    logits = [torch.randn(x.shape[0], spec["num_classes"], *x.shape[-2:], requires_grad=True) for x, _ in batches]

    def batching() -> None:
        for b in plan_batches(len(prepared), spec["batch_size"], generator):
            make_batch(prepared, b, generator=generator, crop_size=None, augment_data=True,
                       ignore_index=IGNORE_INDEX)

    def masked_loss() -> None:
        for lg, (_, y) in zip(logits, batches, strict=True):
            segmentation_loss(lg, y, "ce").backward()

    def plain_loss() -> None:
        for lg, (_, y) in zip(logits, batches, strict=True):
            F.cross_entropy(lg, y).backward()

    def iou() -> None:
        cm = ConfusionMatrix(spec["num_classes"])
        for lg, (_, y) in zip(logits, batches, strict=True):
            cm.update(argmax_classes(lg.detach(), dim=1), y)
        cm.mean_iou()

    return {"augment_batch": batching, "masked_loss": masked_loss, "plain_loss": plain_loss, "iou": iou}


# ----------------------------------------------------------------------------- data path


def datapath(spec: dict[str, Any]) -> dict[str, Any]:
    """Object storage -> decoded -> normalised -> augmented batches, the trainer's way.

    `chain`: what a job does before and during its first epoch: ObjectStore.get + decode of every
    tile and mask on an 8-thread pool (as JobExecutor._train), normalisation
    (segcore.data.prepare_samples) and one epoch of augmented batches (segcore.data.make_batch).
    `stages`: the same steps one tile at a time, each timed on its own, to show where time goes.
    """
    threads = _set_threads(spec["threads"])
    path = _DataPath(store=_object_store(spec),
                     pairs=[(t["name"], t["image_uri"], t["mask_uri"]) for t in spec["tiles"]],
                     num_classes=spec["num_classes"], batch_size=spec["batch_size"])
    path.chain(0)  # warm-up: connections, allocator, first-call costs
    chains = [path.chain(r + 1) for r in range(spec["repeats"])]
    return {"threads": threads, "tiles": len(path.pairs), "chains": chains,
            "stage_ms_per_tile": path.stage_ms_per_tile()}


@dataclass(frozen=True)
class _DataPath:
    """The benchmark's tiles in the stack's object storage and the trainer's batch settings."""

    store: ObjectStore
    pairs: list[tuple[str, str, str]]  # (name, image key, mask key) per tile
    num_classes: int
    batch_size: int

    def _fetch_decode(self) -> list[Sample]:
        """ObjectStore.get + decode of every tile and mask on an 8-thread pool (as the trainer)."""
        from concurrent.futures import ThreadPoolExecutor

        from segcore import imaging
        from segcore.data import Sample

        def load(pair: tuple[str, str, str]) -> Sample:
            name, image_key, mask_key = pair
            image = imaging.decode_image(self.store.get(image_key), name)
            mask = imaging.decode_mask(self.store.get(mask_key), name)
            return Sample(name, image, mask)

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(load, self.pairs))

    def chain(self, seed: int) -> dict[str, float]:
        """One pass of the whole chain; seconds of each part and in total."""
        import torch

        from segcore import imaging
        from segcore.data import make_batch, plan_batches, prepare_samples
        from segcore.metrics import IGNORE_INDEX

        t0 = time.perf_counter()
        samples = self._fetch_decode()
        t1 = time.perf_counter()
        norm = imaging.compute_normalization(s.image for s in samples)
        prepared = prepare_samples(samples, norm, self.num_classes, IGNORE_INDEX, field="samples")
        t2 = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        for indices in plan_batches(len(self.pairs), self.batch_size, generator):
            make_batch(prepared, indices, generator=generator, crop_size=None, augment_data=True,
                       ignore_index=IGNORE_INDEX)
        t3 = time.perf_counter()
        return {"fetch_decode": t1 - t0, "normalise": t2 - t1, "augment_batch": t3 - t2, "total": t3 - t0}

    def stage_ms_per_tile(self) -> dict[str, float]:
        """Per-stage cost, one tile at a time on one thread."""
        import torch

        from segcore import imaging
        from segcore.data import Sample, make_batch, prepare_samples
        from segcore.metrics import IGNORE_INDEX

        stages = _StageTimes("s3_get", "decode", "normalise", "augment_collate")
        generator = torch.Generator().manual_seed(0)
        norm = imaging.Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        for name, image_key, mask_key in self.pairs:
            t0 = time.perf_counter()
            image_bytes, mask_bytes = self.store.get(image_key), self.store.get(mask_key)
            t1 = time.perf_counter()
            sample = Sample(name, imaging.decode_image(image_bytes, name), imaging.decode_mask(mask_bytes, name))
            t2 = time.perf_counter()
            prepared = prepare_samples([sample], norm, self.num_classes, IGNORE_INDEX, field="samples")
            t3 = time.perf_counter()
            make_batch(prepared * 2, [0, 1], generator=generator, crop_size=None, augment_data=True,
                       ignore_index=IGNORE_INDEX)
            t4 = time.perf_counter()
            stages.add(t1 - t0, t2 - t1, t3 - t2, (t4 - t3) / 2)
        return stages.median_ms()


# ----------------------------------------------------------------------------- bare inference


@dataclass(frozen=True)
class _LoadedModel:
    """A model file's weights in eval mode and the tiles, decoded and normalised in memory."""

    model: Any
    meta: Any
    norm: Any
    images: list[Any]  # decoded tiles
    pixels: list[Any]  # the same, normalised tensors

    def forward_s(self, batch_size: int) -> float:
        """Seconds of bare forward passes over all tiles, `batch_size` tiles per pass."""
        import torch

        started = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(self.pixels), batch_size):
                self.model(pixel_values=torch.stack(self.pixels[i:i + batch_size]))
        return time.perf_counter() - started

    def predict_mask_s(self) -> float:
        """Seconds of segcore.inference.predict_mask over all tiles (normalise + forward + argmax)."""
        from segcore import inference

        started = time.perf_counter()
        for image in self.images:
            inference.predict_mask(self.model, image, self.norm, tile_size=self.meta.tile_size or None)
        return time.perf_counter() - started


_INFER_CACHE: dict[str, _LoadedModel] = {}


def _loaded_model(store: ObjectStore, spec: dict[str, Any]) -> tuple[_LoadedModel, bool]:
    """The spec's model and tiles, loaded on the first call and kept; True when loaded just now."""
    from segcore import checkpoint, imaging, inference

    cache_key = json.dumps([spec["weights_uri"], spec["tiles"]])
    first = cache_key not in _INFER_CACHE
    if first:
        model, meta = checkpoint.load_model(store.get(spec["weights_uri"]))
        model.eval()
        norm = imaging.Normalization.from_dict(meta.normalization)
        paths = [Path(p) for p in spec["tiles"]]
        images = [imaging.decode_image(p.read_bytes(), p.name) for p in paths]
        pixels = [inference.normalize(im, norm) for im in images]
        _INFER_CACHE[cache_key] = _LoadedModel(model, meta, norm, images, pixels)
    return _INFER_CACHE[cache_key], first


def bare_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward passes of the registered model's weights on the same tiles, in memory: tiles/s of
    one timed pass per variant (after a warm-up on the first call; the model stays loaded).

    With `stages`, also times per tile the steps the trainer node's analysis does around the
    forward pass (S3 get, decode, PNG encode of the mask, S3 put), so a gap can be attributed.
    """
    threads = _set_threads(spec.get("threads"))
    store = _object_store(spec)
    loaded, first = _loaded_model(store, spec)
    n = len(loaded.pixels)
    variants: dict[str, Callable[[], float]] = {"bare_b1": lambda: loaded.forward_s(1),
                                                "bare_b8": lambda: loaded.forward_s(8),
                                                "predict_mask": loaded.predict_mask_s}
    if first:
        for fn in variants.values():
            fn()  # warm-up
    result: dict[str, Any] = {"threads": threads, "tiles": n,
                              "tiles_per_s": {label: n / fn() for label, fn in variants.items()}}
    if spec.get("stages"):
        result["stage_ms_per_tile"] = _node_steps_ms(store, spec["image_keys"], loaded.images[0].shape[:2])
        result["node_path_tiles_per_s"] = _node_path(store, spec)
    return result


def _node_steps_ms(store: ObjectStore, image_keys: list[str], mask_shape: tuple[int, int]) -> dict[str, float]:
    """Per tile, the trainer node's analysis steps around the forward pass: S3 get, decode, PNG
    encode of a mask, S3 put (to a probe prefix, deleted afterwards)."""
    import numpy as np

    from segcore import imaging
    from services.common import object_keys

    probe = object_keys.scratch_prefix("analysis-probe")
    stages = _StageTimes("s3_get", "decode", "encode_png", "s3_put")
    mask = np.zeros(mask_shape, dtype=np.int64)
    for i, key in enumerate(image_keys):
        t0 = time.perf_counter()
        data = store.get(key)
        t1 = time.perf_counter()
        imaging.decode_image(data, key)
        t2 = time.perf_counter()
        png = imaging.encode_mask_png(mask)
        t3 = time.perf_counter()
        store.put(f"{probe}{i}.png", png, content_type="image/png")
        t4 = time.perf_counter()
        stages.add(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    store.delete_prefix(probe)
    return stages.median_ms()


def _node_path(store: ObjectStore, spec: dict[str, Any]) -> dict[str, float]:
    """The trainer node's own analysis code (services.trainer_svc.analysis.Analyzer: S3 get, decode,
    predict_mask, PNG encode, S3 put per tile) in this process, without gRPC, run on this main
    thread, on a second thread (the node runs it on a gRPC worker thread), and on a second
    thread with one torch thread. Attribution only."""
    import threading

    import torch
    from segtrain.trainer.v1 import trainer_pb2

    from services.common import object_keys
    from services.trainer_svc.analysis import Analyzer

    analyzer = Analyzer(store, "cpu")
    ref = trainer_pb2.ModelRef(weights_uri=spec["weights_uri"], weights_sha256=spec["weights_sha256"])
    request = trainer_pb2.AnalyzeTilesRequest(model=ref, image_keys=spec["image_keys"],
                                              output_prefix=object_keys.analysis_prefix("bench-node-path"))
    n = len(spec["image_keys"])

    def timed(threads: int | None) -> float:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            analyzer.analyze(request)  # warm-up (and the model load, the first time)
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                analyzer.analyze(request)
                runs.append(n / (time.perf_counter() - started))
            return statistics.median(runs)
        finally:
            torch.set_num_threads(previous)

    def on_thread(threads: int | None) -> float:
        out: list[float] = []
        thread = threading.Thread(target=lambda: out.append(timed(threads)))
        thread.start()
        thread.join()
        return out[0]

    result = {"main_thread": timed(None), "other_thread": on_thread(None), "other_thread_1_torch_thread": on_thread(1)}
    store.delete_prefix(object_keys.analysis_prefix("bench-node-path"))
    return result


# ----------------------------------------------------------------------------- watchers


class _WatchStreams:
    """`count` concurrent WatchJobEvents streams of one job and what each of them received."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count: int = spec["count"]
        self.first = [False] * self.count  # stream i has received its first message
        self.events = [0] * self.count
        self.errors: dict[str, int] = {}
        self.first_all: asyncio.Event | None = None  # created inside the event loop

    async def one(self, i: int) -> None:
        """Stream i: its own channel, reading and decoding every event until the stream ends."""
        import grpc
        from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

        async with grpc.aio.insecure_channel(self.spec["address"]) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            request = metrics_pb2.WatchJobEventsRequest(job=self.spec["job"], after_seq=0)
            try:
                metadata = [tuple(kv) for kv in self.spec.get("metadata", [])]  # the bearer token, if any
                async for item in stub.WatchJobEvents(request, metadata=metadata or None):
                    if not self.first[i]:
                        self.first[i] = True
                        if all(self.first) and self.first_all is not None:
                            self.first_all.set()
                    if item.HasField("event"):
                        self.events[i] += 1
                        item.event.progress.percent  # noqa: B018 - consume it like a UI would
            except grpc.aio.AioRpcError as exc:
                self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1

    async def run(self) -> dict[str, Any]:
        import asyncio

        self.first_all = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(self.one(i)) for i in range(self.count)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_all.wait(), self.spec["connect_timeout_s"])
        print(f"CONNECTED {sum(self.first)}", flush=True)
        cpu_connected = time.process_time()
        _done, pending = await asyncio.wait(tasks, timeout=self.spec["timeout_s"])
        for task in pending:
            task.cancel()
        events = self.events
        return {"count": self.count, "connected": sum(self.first), "finished": self.count - len(pending),
                "events_min": min(events), "events_median": statistics.median(events), "events_max": max(events),
                "errors": self.errors, "seconds": time.monotonic() - started,
                "cpu_s": time.process_time() - cpu_connected}  # after all streams were open


def watchers(spec: dict[str, Any]) -> dict[str, Any]:
    """`count` concurrent WatchJobEvents streams of one job (one channel each, like separate UIs),
    each reading and decoding every event until the job's final event ends the stream.

    Prints `CONNECTED <n>` once every stream has received its first message (or after
    `connect_timeout_s`), then the summary when all streams ended or `timeout_s` passed."""
    import asyncio

    # Loaded before the streams start their clock; each stream's own import then comes from the cache.
    import grpc  # noqa: F401
    from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc  # noqa: F401

    return asyncio.run(_WatchStreams(spec).run())


COMMANDS = {"bare-train": bare_train, "core-train": core_train, "core-parts": core_parts, "datapath": datapath,
            "bare-infer": bare_infer, "watchers": watchers}


def serve() -> None:
    """Answers one JSON request per stdin line ({"command": ..., "spec": ...}) with one JSON line,
    so runs can be interleaved with jobs without paying the torch import each time."""
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(COMMANDS[request["command"]](request["spec"])), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*sorted(COMMANDS), "serve"])
    args = parser.parse_args()
    if args.command == "serve":
        serve()
        return
    spec = json.loads(sys.stdin.readline())  # on stdin, not argv: it may carry the S3 secret
    result = COMMANDS[args.command](spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
