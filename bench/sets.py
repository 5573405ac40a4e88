"""`make bench-sets`: what creating a training set costs the pipeline service, and how it grows.

For sets of 1,000, 4,000 and 10,000 tiles of 512² 16-bit fluorescence (segcore.regimes, TIFF),
one local stack (no trainer node) creates each set through the SDK: uploads, then
CreateTrainingSet, which returns at once with the set PREPARING, then polls it until READY. A
sampler reads the pipeline service's resident memory every 0.1 s. It reports, per size: the
seconds CreateTrainingSet took to answer, the preparation's seconds and tiles/s, and the
service's peak RSS during preparation above its RSS just before (the growth).

Targets (issue 11): growth ≤ 200 MB at 10,000 tiles of 512²; the service at rest ≤ 300 MB RSS,
without torch loaded.

    .venv/bin/python bench/sets.py [--sizes 1000,4000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))

from scale import TILE, write_set
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from segcore import regimes

REGIME = "fluorescence-16bit"
PIPELINE = "sets-512"
BASE_TILES = 500
GROWTH_TARGET_MB = 200.0
REST_TARGET_MB = 300.0


@dataclass
class SizeResult:
    tiles: int
    create_call_s: float  # CreateTrainingSet's answer (uploads excluded)
    upload_s: float
    prepare_s: float
    rss_before_mb: float
    peak_rss_mb: float

    @property
    def growth_mb(self) -> float:
        return self.peak_rss_mb - self.rss_before_mb

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.prepare_s


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.1)


class TimedStub:
    """The pipeline stub, timing each CreateTrainingSet call (the SDK's uploads before it are not)."""

    def __init__(self, stub: object) -> None:
        self._stub, self.create_call_s = stub, 0.0

    def __getattr__(self, method: str) -> object:
        call = getattr(self._stub, method)
        if method != "CreateTrainingSet":
            return call

        def timed(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.create_call_s = time.perf_counter() - started
        return timed


def measure(client: Client, pid: int, size: int, images: Path, masks: Path) -> SizeResult:
    stub = TimedStub(client.pipeline)
    client.pipeline = stub  # type: ignore[assignment]
    before = rss_mb(pid)
    started = time.perf_counter()
    created = client.create_training_set(f"sets-{size}", images, masks, class_names=regimes.class_names(REGIME),
                                         pipeline=PIPELINE, wait=False)
    upload_s = time.perf_counter() - started - stub.create_call_s
    assert created.state == pb.TrainingSet.STATE_PREPARING, created.state
    sampler = PeakRss(pid)
    sampler.start()
    started = time.perf_counter()
    ready = client.wait_for_training_set(created.name, timeout_s=3600)
    prepare_s = time.perf_counter() - started
    sampler.running = False
    sampler.join()
    assert ready.tile_count == size
    client.pipeline = stub._stub  # type: ignore[assignment]
    return SizeResult(size, stub.create_call_s, upload_s, prepare_s, before, max(sampler.peak, before))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,10000")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = Path("bench-output/sets")
    shutil.rmtree(out, ignore_errors=True)
    print(f"bench-sets: sizes {sizes}, {TILE}² {REGIME}, {os.cpu_count()} CPUs", flush=True)
    base = regimes.generate_regime(REGIME, min(BASE_TILES, sizes[-1]), tile_size=TILE, seed=0)
    results = []
    with LocalStack(out / "stack", trainers=0) as stack, \
            Client(stack.pipeline_address, token=stack.tokens["trainer"]) as client:
        pid = stack.processes["pipeline"].popen.pid
        with Client(stack.pipeline_address, token=stack.tokens["admin"]) as admin:
            admin.pipeline.CreatePipeline(pb.CreatePipelineRequest(pipeline_id=PIPELINE, pipeline=pb.Pipeline(
                display_name="512² fluorescence", type=pb.Pipeline.TYPE_TRAINING, tile_size=TILE,
                class_names=regimes.class_names(REGIME))), timeout=60)
        time.sleep(2.0)
        at_rest = rss_mb(pid)
        torch_loaded = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        print(f"pipeline service at rest: {at_rest:.0f} MB RSS, torch loaded: {torch_loaded}", flush=True)
        for size in sizes:
            images, masks = write_set(size, base, out / f"set-{size}")
            results.append(measure(client, pid, size, images, masks))
            print(f"{size} tiles: {asdict(results[-1])}", flush=True)
            shutil.rmtree(out / f"set-{size}")
        torch_loaded = torch_loaded or "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    print(f"\n{'tiles':>6} {'create call s':>14} {'upload s':>9} {'prepare s':>10} {'tiles/s':>8} "
          f"{'RSS before MB':>14} {'peak MB':>8} {'growth MB':>10}")
    for r in results:
        print(f"{r.tiles:>6} {r.create_call_s:>14.2f} {r.upload_s:>9.0f} {r.prepare_s:>10.1f} {r.tiles_per_s:>8.0f} "
              f"{r.rss_before_mb:>14.0f} {r.peak_rss_mb:>8.0f} {r.growth_mb:>10.0f}")
    last = results[-1]
    verdicts = {
        "growth_mb": (last.growth_mb, GROWTH_TARGET_MB, last.growth_mb <= GROWTH_TARGET_MB),
        "rest_rss_mb": (at_rest, REST_TARGET_MB, at_rest <= REST_TARGET_MB and not torch_loaded),
    }
    word = {True: "PASS", False: "MISS"}
    print(f"growth at {last.tiles} tiles {last.growth_mb:.0f} MB (target <= {GROWTH_TARGET_MB:.0f}): "
          f"{word[verdicts['growth_mb'][2]]}")
    print(f"at rest {at_rest:.0f} MB, torch loaded {torch_loaded} (target <= {REST_TARGET_MB:.0f}, no torch): "
          f"{word[verdicts['rest_rss_mb'][2]]}")
    summary = {"at_rest_mb": at_rest, "torch_loaded": torch_loaded,
               "sizes": [{**asdict(r), "growth_mb": r.growth_mb, "tiles_per_s": r.tiles_per_s} for r in results],
               "verdicts": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in verdicts.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
