"""`make bench-analysis`: analysis jobs against the bare batched forward, and how memory grows.

One local stack (one trainer node) trains a small model on 256² tiles (1 epoch: the weights do
not matter to speed), then, side by side in this run:

* **bare**: this process loads the same exported model and runs segcore.inference.predict_masks
  (normalisation, batched forward, argmax) over tiles already decoded in memory, batches of 8,
  on as many threads as the node's worker gets (cores ÷ processes);
* **product**: an analysis job per size (1,000, 4,000, 10,000 uploaded 256² PNG tiles) through
  the SDK: CreateAnalysisJob, then the job's events. Its rate is tiles ÷ the seconds between the
  ANALYSING and FINALISING phase events (fetch, decode, forward, mask PNG, connected components,
  storage of masks and result pages); also reported: the seconds to finalise (CSV, JSON,
  manifest) and the whole job from CreateAnalysisJob to SUCCEEDED (scheduling and the worker's
  start included). A sampler reads the trainer node's process tree PSS (node and worker) every
  0.25 s.

Target (issue 11): at 10,000 tiles, product ≥ 0.9 × bare, with the node's peak memory not growing
with the number of tiles.

    .venv/bin/python bench/analysis.py [--sizes 1000,4000,10000] [--architecture A] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))

import urllib.request

import numpy as np
import torch
from PIL import Image
from pydantic import SecretStr
from scale import PeakSampler
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from segcore import checkpoint, inference, synthetic
from segcore.imaging import Normalization
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore

S = common_pb2
TILE = 256
PIPELINE = "analysis-256"
DISTINCT = 64  # distinct tile contents, cycled over the uploaded names
BARE_TILES = 512
BATCH = 8
RATIO_TARGET = 0.9


@dataclass
class SizeResult:
    tiles: int
    upload_s: float
    analysing_s: float  # ANALYSING -> FINALISING phase events
    finalising_s: float  # FINALISING -> SUCCEEDED
    job_s: float  # CreateAnalysisJob -> SUCCEEDED
    node_peak_pss_mb: float
    node_cpu_ms_per_tile: float  # the node, its launcher and worker: CPU per tile over the job
    s3_cpu_ms_per_tile: float  # the S3 server's (on the same cores here; a separate host in production)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.analysing_s


def cpu_s(pid: int) -> float:
    """CPU seconds a process used so far (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found[1:]


class WorkerCpu(PeakSampler):
    """The node's descendants' CPU seconds (launcher and worker), last seen before they exit."""

    def run(self) -> None:
        self.peak = 0.0
        while self.running:
            total = 0.0
            for pid in descendants(self.pid):
                try:
                    total += cpu_s(pid)
                except OSError:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.25)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def train_model(client: Client, admin: Client, architecture: str, folder: Path) -> pb.Model:
    admin.pipeline.CreatePipeline(pb.CreatePipelineRequest(pipeline_id=PIPELINE, pipeline=pb.Pipeline(
        display_name="256² analysis bench", type=pb.Pipeline.TYPE_TRAINING, tile_size=TILE,
        class_names=["background", "cell", "debris"])), timeout=60)
    tiles = synthetic.generate_tiles(8, tile_size=TILE, seed=0)
    synthetic.write_tile_set(tiles, folder / "tiles", folder / "masks")
    training_set = client.create_training_set("bench-analysis", folder / "tiles", folder / "masks",
                                              pipeline=PIPELINE, class_names=["background", "cell", "debris"])
    job = client.create_job(pipeline=PIPELINE, training_set=training_set.name, hyperparameters=S.Hyperparameters(
        architecture=architecture, epochs=1, batch_size=4))
    client.start_job(job.name)
    for _ in client.watch(job.name, include_batch_progress=False):
        pass
    done = client.get_job(job.name)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    return client.pipeline.GetModel(pb.GetModelRequest(name=done.model))


def bare_rate(store: ObjectStore, model_row: pb.Model, images: list[np.ndarray], threads: int) -> float:
    """Tiles/s of predict_masks on decoded tiles, batches of BATCH, after a warm-up."""
    torch.set_num_threads(threads)
    model, meta = checkpoint.load_model(store.get(model_row.weights.uri))
    model.eval()
    norm = Normalization.from_dict(meta.normalization)
    work = [images[i % len(images)] for i in range(BARE_TILES)]
    inference.predict_masks(model, work[: 2 * BATCH], norm, batch_size=BATCH, tile_size=meta.tile_size)
    started = time.perf_counter()
    for start in range(0, len(work), BATCH):
        inference.predict_masks(model, work[start : start + BATCH], norm, batch_size=BATCH, tile_size=meta.tile_size)
    return len(work) / (time.perf_counter() - started)


def upload(client: Client, contents: list[bytes], count: int) -> list[str]:
    """`count` uploaded tiles (contents cycled), through presigned PUTs, 8 at a time."""
    keys: list[str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, count, 1000):
            names = [f"t{i:06d}.png" for i in range(start, min(count, start + 1000))]
            grant = client.pipeline.CreateUpload(pb.CreateUploadRequest(file_names=names), timeout=60)

            def put(item: tuple[int, pb.Upload.File]) -> None:
                index, file = item
                request = urllib.request.Request(file.url, data=contents[index % len(contents)], method="PUT")
                for attempt in range(6):
                    try:
                        with urllib.request.urlopen(request, timeout=60):
                            return
                    except OSError:
                        if attempt == 5:
                            raise
                        time.sleep(0.2 * 2**attempt)

            list(pool.map(put, enumerate(grant.files, start=start)))
            keys += [f.key for f in grant.files]
    return keys


def analyse(client: Client, node_pid: int, s3_pid: int, model: pb.Model, keys: list[str], upload_s: float
            ) -> SizeResult:
    sampler, worker_cpu = PeakSampler(node_pid), WorkerCpu(node_pid)
    sampler.start()
    worker_cpu.start()
    cpu_before = cpu_s(node_pid), cpu_s(s3_pid)
    started = time.perf_counter()
    created = client.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(model=model.name, image_keys=keys),
                                                timeout=120)
    marks: dict[str, float] = {}
    for event in client.watch(created.name, include_batch_progress=False):
        if event.HasField("phase_change"):
            marks.setdefault(S.Phase.Name(event.phase_change.phase), time.perf_counter())
    ended = time.perf_counter()
    sampler.running = worker_cpu.running = False
    sampler.join()
    worker_cpu.join()
    done = client.get_analysis(created.name)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.results.tiles_analysed == len(keys), done.results
    node_cpu = cpu_s(node_pid) - cpu_before[0] + worker_cpu.peak
    s3_cpu = cpu_s(s3_pid) - cpu_before[1]
    return SizeResult(len(keys), upload_s, marks["PHASE_FINALISING"] - marks["PHASE_ANALYSING"],
                      ended - marks["PHASE_FINALISING"], ended - started, sampler.peak,
                      1000 * node_cpu / len(keys), 1000 * s3_cpu / len(keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,10000")
    parser.add_argument("--architecture", default="upernet-convnext-cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of both sides (default: the cores, what the node's worker takes)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = Path("bench-output/analysis")
    shutil.rmtree(out, ignore_errors=True)
    threads = args.threads or os.cpu_count() or 1  # unset: what the node's one worker gets (cores ÷ processes)
    print(f"bench-analysis: sizes {sizes}, {TILE}² tiles, {args.architecture}, {threads} threads", flush=True)
    tiles = synthetic.generate_tiles(DISTINCT, tile_size=TILE, seed=1)
    contents = [png(t.image) for t in tiles]
    results = []
    env = {"SEGTRAIN_TRAINER_NUM_THREADS": str(threads)} if args.threads else {}
    with LocalStack(out / "stack", trainers=1, env_overrides=env) as stack, \
            Client(stack.pipeline_address, token=stack.tokens["trainer"]) as client, \
            Client(stack.pipeline_address, token=stack.tokens["admin"]) as admin:
        store = ObjectStore(StorageSettings(endpoint=stack.s3_endpoint, access_key=stack.access_key,
                                            secret_key=SecretStr(stack.secret_key)))
        model = train_model(client, admin, args.architecture, out / "train")
        bare = bare_rate(store, model, [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in contents],
                         threads)
        print(f"bare batched forward: {bare:.1f} tiles/s", flush=True)
        node_pid = next(p.popen.pid for name, p in stack.processes.items() if name.startswith("trainer-"))
        s3_pid = stack.processes["s3"].popen.pid
        for size in sizes:
            started = time.perf_counter()
            keys = upload(client, contents, size)
            results.append(analyse(client, node_pid, s3_pid, model, keys, time.perf_counter() - started))
            r = results[-1]
            print(f"{size} tiles: {asdict(r)}, {r.tiles_per_s:.1f} tiles/s ({r.tiles_per_s / bare:.2f}x bare)",
                  flush=True)
    print(f"\n{'tiles':>6} {'upload s':>9} {'analysing s':>12} {'tiles/s':>8} {'x bare':>7} {'finalise s':>11} "
          f"{'job s':>7} {'node peak PSS MB':>17} {'node CPU ms/tile':>17} {'S3 CPU ms/tile':>15}")
    for r in results:
        print(f"{r.tiles:>6} {r.upload_s:>9.0f} {r.analysing_s:>12.1f} {r.tiles_per_s:>8.1f} "
              f"{r.tiles_per_s / bare:>7.2f} {r.finalising_s:>11.1f} {r.job_s:>7.0f} {r.node_peak_pss_mb:>17.0f} "
              f"{r.node_cpu_ms_per_tile:>17.1f} {r.s3_cpu_ms_per_tile:>15.1f}")
    print(f"bare forward: {1000 / bare:.1f} ms a tile of wall time on {threads} threads "
          f"(at most {1000 * threads / bare:.1f} ms of CPU)")
    last = results[-1]
    ratio = last.tiles_per_s / bare
    growth = last.node_peak_pss_mb - results[0].node_peak_pss_mb
    print(f"bare {bare:.1f} tiles/s; at {last.tiles} tiles the product runs {ratio:.2f}x bare "
          f"(target >= {RATIO_TARGET}): {'PASS' if ratio >= RATIO_TARGET else 'MISS'}")
    print(f"node peak PSS {results[0].node_peak_pss_mb:.0f} MB at {results[0].tiles} tiles, "
          f"{last.node_peak_pss_mb:.0f} MB at {last.tiles} ({growth:+.0f} MB)")
    summary = {"architecture": args.architecture, "threads": threads, "bare_tiles_per_s": bare,
               "sizes": [{**asdict(r), "tiles_per_s": r.tiles_per_s, "ratio": r.tiles_per_s / bare} for r in results],
               "verdict": {"ratio": ratio, "target": RATIO_TARGET, "pass": ratio >= RATIO_TARGET},
               "node_pss_growth_mb": growth}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
