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
from pathlib import Path
from typing import Any

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
    from segcore.imaging import compute_normalization, normalize

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
    import torch
    import torch.nn.functional as F

    from segcore.data import make_batch, plan_batches, prepare_samples
    from segcore.imaging import compute_normalization
    from segcore.losses import segmentation_loss
    from segcore.metrics import IGNORE_INDEX, ConfusionMatrix, argmax_classes

    threads = _set_threads(spec["threads"])
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

    parts = {"augment_batch": batching, "masked_loss": masked_loss, "plain_loss": plain_loss, "iou": iou}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for fn in parts.values():
        fn()  # warm-up
    for _ in range(spec.get("repeats", 7)):
        for name, fn in parts.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"threads": threads, "ms_per_epoch": {"augment_batch": ms["augment_batch"],
                                                 "masked_loss_extra": ms["masked_loss"] - ms["plain_loss"],
                                                 "iou_bookkeeping": ms["iou"]}}


# ----------------------------------------------------------------------------- data path


def datapath(spec: dict[str, Any]) -> dict[str, Any]:
    """Object storage -> decoded -> normalised -> augmented batches, the trainer's way.

    `chain`: what a job does before and during its first epoch: ObjectStore.get + decode of every
    tile and mask on an 8-thread pool (as JobExecutor._load_samples), normalisation
    (segcore.data.prepare_samples) and one epoch of augmented batches (segcore.data.make_batch).
    `stages`: the same steps one tile at a time, each timed on its own, to show where time goes.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from pydantic import SecretStr

    from segcore import imaging
    from segcore.data import Sample, make_batch, plan_batches, prepare_samples
    from segcore.metrics import IGNORE_INDEX
    from services.common.settings import StorageSettings
    from services.common.storage import ObjectStore

    threads = _set_threads(spec["threads"])
    store = ObjectStore(StorageSettings(endpoint=spec["s3_endpoint"], access_key=spec["access_key"],
                                        secret_key=SecretStr(spec["secret_key"])))
    pairs = [(t["name"], t["image_uri"], t["mask_uri"]) for t in spec["tiles"]]
    n, num_classes, batch_size = len(pairs), spec["num_classes"], spec["batch_size"]

    def load(pair: tuple[str, str, str]) -> Sample:
        name, image_key, mask_key = pair
        image = imaging.decode_image(store.get(image_key), name)
        mask = imaging.decode_mask(store.get(mask_key), name)
        return Sample(name, image, mask)

    def one_chain(seed: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            samples = list(pool.map(load, pairs))
        t1 = time.perf_counter()
        norm = imaging.compute_normalization(s.image for s in samples)
        prepared = prepare_samples(samples, norm, num_classes, IGNORE_INDEX, field="samples")
        t2 = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        for indices in plan_batches(n, batch_size, generator):
            make_batch(prepared, indices, generator=generator, crop_size=None, augment_data=True,
                       ignore_index=IGNORE_INDEX)
        t3 = time.perf_counter()
        return {"fetch_decode": t1 - t0, "normalise": t2 - t1, "augment_batch": t3 - t2, "total": t3 - t0}

    one_chain(0)  # warm-up: connections, allocator, first-call costs
    chains = [one_chain(r + 1) for r in range(spec["repeats"])]

    # Per-stage cost, one tile at a time on one thread.
    stage: dict[str, list[float]] = {"s3_get": [], "decode": [], "normalise": [], "augment_collate": []}
    generator = torch.Generator().manual_seed(0)
    norm = imaging.Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for name, image_key, mask_key in pairs:
        t0 = time.perf_counter()
        image_bytes, mask_bytes = store.get(image_key), store.get(mask_key)
        t1 = time.perf_counter()
        sample = Sample(name, imaging.decode_image(image_bytes, name), imaging.decode_mask(mask_bytes, name))
        t2 = time.perf_counter()
        prepared = prepare_samples([sample], norm, num_classes, IGNORE_INDEX, field="samples")
        t3 = time.perf_counter()
        make_batch(prepared * 2, [0, 1], generator=generator, crop_size=None, augment_data=True,
                   ignore_index=IGNORE_INDEX)
        t4 = time.perf_counter()
        for key, value in zip(stage, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) / 2), strict=True):
            stage[key].append(value)
    return {"threads": threads, "tiles": n, "chains": chains,
            "stage_ms_per_tile": {k: 1000 * statistics.median(v) for k, v in stage.items()}}


# ----------------------------------------------------------------------------- bare inference


_INFER_CACHE: dict[str, Any] = {}


def bare_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward passes of the registered model's weights on the same tiles, in memory: tiles/s of
    one timed pass per variant (after a warm-up on the first call; the model stays loaded).

    With `stages`, also times per tile the steps the trainer node's analysis does around the
    forward pass (S3 get, decode, PNG encode of the mask, S3 put), so a gap can be attributed.
    """
    import numpy as np
    import torch
    from pydantic import SecretStr

    from segcore import checkpoint, imaging, inference
    from services.common.settings import StorageSettings
    from services.common.storage import ObjectStore

    threads = _set_threads(spec.get("threads"))
    store = ObjectStore(StorageSettings(endpoint=spec["s3_endpoint"], access_key=spec["access_key"],
                                        secret_key=SecretStr(spec["secret_key"])))
    cache_key = json.dumps([spec["weights_uri"], spec["tiles"]])
    first = cache_key not in _INFER_CACHE
    if first:
        model, meta = checkpoint.load_model(store.get(spec["weights_uri"]))
        model.eval()
        norm = imaging.Normalization.from_dict(meta.normalization)
        paths = [Path(p) for p in spec["tiles"]]
        images = [imaging.decode_image(p.read_bytes(), p.name) for p in paths]
        _INFER_CACHE[cache_key] = (model, meta, norm, images, [imaging.normalize(im, norm) for im in images])
    model, meta, norm, images, pixels = _INFER_CACHE[cache_key]
    n = len(pixels)

    def forward(batch_size: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch_size):
                model(pixel_values=torch.stack(pixels[i:i + batch_size]))
        return time.perf_counter() - started

    def predict_mask_path() -> float:
        started = time.perf_counter()
        for image in images:
            inference.predict_mask(model, image, norm, tile_size=meta.tile_size or None)
        return time.perf_counter() - started

    variants = {"bare_b1": lambda: forward(1), "bare_b8": lambda: forward(8), "predict_mask": predict_mask_path}
    if first:
        for fn in variants.values():
            fn()  # warm-up
    result: dict[str, Any] = {"threads": threads, "tiles": n,
                              "tiles_per_s": {label: n / fn() for label, fn in variants.items()}}
    if spec.get("stages"):
        stage: dict[str, list[float]] = {"s3_get": [], "decode": [], "encode_png": [], "s3_put": []}
        mask = np.zeros(images[0].shape[:2], dtype=np.int64)
        for i, key in enumerate(spec["image_keys"]):
            t0 = time.perf_counter()
            data = store.get(key)
            t1 = time.perf_counter()
            imaging.decode_image(data, key)
            t2 = time.perf_counter()
            png = imaging.encode_mask_png(mask)
            t3 = time.perf_counter()
            store.put(f"bench/analysis-probe/{i}.png", png, content_type="image/png")
            t4 = time.perf_counter()
            for k, v in zip(stage, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stage[k].append(v)
        store.delete_prefix("bench/analysis-probe/")
        result["stage_ms_per_tile"] = {k: 1000 * statistics.median(v) for k, v in stage.items()}
        result["node_path_tiles_per_s"] = _node_path(store, spec)
    return result


def _node_path(store: Any, spec: dict[str, Any]) -> dict[str, float]:
    """The trainer node's own analysis code (services.trainer_svc.analysis.Analyzer: S3 get, decode,
    predict_mask, PNG encode, S3 put per tile) in this process, without gRPC, run on this main
    thread, on a second thread (the node runs it on a gRPC worker thread), and on a second
    thread with one torch thread. Attribution only."""
    import threading

    import torch
    from segtrain.trainer.v1 import trainer_pb2

    from services.trainer_svc.analysis import Analyzer

    analyzer = Analyzer(store, "cpu")
    request = trainer_pb2.AnalyzeTilesRequest(model=trainer_pb2.ModelRef(weights_uri=spec["weights_uri"]),
                                              image_keys=spec["image_keys"], output_prefix="bench/node-path/")
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
    store.delete_prefix("bench/node-path/")
    return result


# ----------------------------------------------------------------------------- watchers


def watchers(spec: dict[str, Any]) -> dict[str, Any]:
    """`count` concurrent WatchJobEvents streams of one job (one channel each, like separate UIs),
    each reading and decoding every event until the job's final event ends the stream.

    Prints `CONNECTED <n>` once every stream has received its first message (or after
    `connect_timeout_s`), then the summary when all streams ended or `timeout_s` passed."""
    import asyncio

    import grpc
    from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

    count = spec["count"]
    first = [False] * count
    events = [0] * count
    errors: dict[str, int] = {}
    first_all: asyncio.Event | None = None  # created inside the event loop

    async def one(i: int) -> None:
        async with grpc.aio.insecure_channel(spec["address"]) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            request = metrics_pb2.WatchJobEventsRequest(job=spec["job"], after_seq=0)
            try:
                metadata = [tuple(kv) for kv in spec.get("metadata", [])]  # the bearer token, if any
                async for item in stub.WatchJobEvents(request, metadata=metadata or None):
                    if not first[i]:
                        first[i] = True
                        if all(first) and first_all is not None:
                            first_all.set()
                    if item.HasField("event"):
                        events[i] += 1
                        item.event.progress.percent  # noqa: B018 - consume it like a UI would
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    async def main() -> dict[str, Any]:
        nonlocal first_all
        first_all = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_all.wait(), spec["connect_timeout_s"])
        print(f"CONNECTED {sum(first)}", flush=True)
        cpu_connected = time.process_time()
        _done, pending = await asyncio.wait(tasks, timeout=spec["timeout_s"])
        for task in pending:
            task.cancel()
        return {"count": count, "connected": sum(first), "finished": count - len(pending),
                "events_min": min(events), "events_median": statistics.median(events), "events_max": max(events),
                "errors": errors, "seconds": time.monotonic() - started,
                "cpu_s": time.process_time() - cpu_connected}  # after all streams were open

    return asyncio.run(main())


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
