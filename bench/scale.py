"""`make bench-scale`: how a trainer node's memory and speed grow with the training set.

For sets of 250, 1,000 and 4,000 tiles of 512² 16-bit fluorescence (segcore.regimes, written as
TIFF), one local stack trains a 1-epoch job per set (`upernet-convnext-cpu`, batch 8, crop 128)
while this script samples the PSS of the trainer node's whole process tree (the node, the
attempt's launcher, its worker and the worker's data-loader processes) every 0.25 s. It reports,
per size: the seconds the set takes to prepare (every tile read, checked and measured once, by the
pipeline service), peak PSS, the time to the first training batch (the job decodes no tile
before it: the set's preparation measured them; it fetches the set into the node's disk cache
when it fits), training images/s of the epoch, and the data path alone as a job uses it (the
fetch, the loader through the disk cache, and the loader with no cache) in tiles/s.

Targets (issue 10): peak ≤ 2.5 GB at 4,000 tiles; slope ≤ 0.1 MB per tile; data path ≥ 5×
the model's consumption (training images/s), the first epoch's load included (the verdict uses
the fetch and the loader through the cache together).

    .venv/bin/python bench/scale.py [--sizes 250,1000,4000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))

from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.names import TERMINAL
from clients.sdk import Client
from clients.stack import LocalStack
from segcore import regimes
from segcore.imaging import encode_mask_png
from services.common.settings import StorageSettings, TrainerSettings, environment, given

REGIME = "fluorescence-16bit"
TILE = 512
PIPELINE = "scale-512"  # the default pipeline's tiles are 256²
BASE_TILES = 500  # rendered once; larger sets are their 8 flips and rotations (distinct tiles)
PEAK_TARGET_MB = 2500.0
SLOPE_TARGET_MB = 0.1
DATA_TARGET = 5.0


@dataclass
class SizeResult:
    tiles: int
    set_seconds: float  # CreateTrainingSet until READY (every tile read, checked and measured once)
    peak_pss_mb: float
    seconds_to_first_batch: float
    train_images_per_s: float
    fetch_tiles_per_s: float  # the set fetched into an empty disk cache before training (8 threads)
    warm_tiles_per_s: float  # the loader through the disk cache that filled
    cold_tiles_per_s: float  # the loader over the cold store (a set larger than the disk cache)

    @property
    def first_epoch_tiles_per_s(self) -> float:
        """The first epoch's whole load: every tile fetched into the cache, then read by the loader."""
        return 1.0 / (1.0 / self.fetch_tiles_per_s + 1.0 / self.warm_tiles_per_s)

    def over_model(self, tiles_per_s: float) -> float:
        return tiles_per_s / self.train_images_per_s if self.train_images_per_s else 0.0


def write_set(count: int, base: list[regimes.RegimeTile], folder: Path) -> tuple[Path, Path]:
    """`count` tiles: the base tiles, then their dihedral variants (a flip or rotation of a tile
    is a different tile to the model, at no rendering cost)."""
    images, masks = folder / "tiles", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(count):
        tile = base[i % len(base)]
        variant = i // len(base)
        image, mask = np.rot90(tile.image, variant % 4), np.rot90(tile.mask, variant % 4)
        if variant >= 4:
            image, mask = image[:, ::-1], mask[:, ::-1]
        name = f"{tile.name}_v{variant}"
        tifffile.imwrite(images / f"{name}.tif", np.ascontiguousarray(image))
        (masks / f"{name}.png").write_bytes(encode_mask_png(np.ascontiguousarray(mask)))
    return images, masks


def process_tree_pss_mb(root: int) -> float:
    """PSS of `root` and all its descendants (shared pages split between their users)."""
    total_kb, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # ended meanwhile
    return total_kb / 1024


class PeakSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, process_tree_pss_mb(self.pid))
            time.sleep(0.25)


def train_job(client: Client, training_set: str, train_tiles: int, epochs: int, node_pid: int
              ) -> tuple[float, float, float]:
    """(peak PSS MB, seconds from RUNNING to the first training batch, training images/s)."""
    job = client.create_job(pipeline=PIPELINE, training_set=training_set,
                            hyperparameters=common_pb2.Hyperparameters(
                                architecture="upernet-convnext-cpu", epochs=epochs, batch_size=8, crop_size=128))
    sampler = PeakSampler(node_pid)
    sampler.start()
    client.start_job(job.name)
    while (current := client.get_job(job.name)).state not in TERMINAL:
        time.sleep(0.5)
    sampler.running = False
    sampler.join()
    if current.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{job.name} ended {current.state}: {current.failure_reason}")
    events = list(client.watch(job.name))
    return sampler.peak, *epoch_timing(events, train_tiles)


def epoch_timing(events: list[common_pb2.JobEvent], train_tiles: int) -> tuple[float, float]:
    """(seconds from the attempt's start to its first training batch, training images/s), from
    the node's own event times."""
    def at(e: common_pb2.JobEvent) -> float:
        return e.event_time.ToDatetime().timestamp()

    def phase(kind: int) -> list[float]:
        return [at(e) for e in events if e.HasField("phase_change") and e.phase_change.phase == kind]

    running = phase(common_pb2.PHASE_PREPARING_DATA)[0]
    training, validating = phase(common_pb2.PHASE_TRAINING), phase(common_pb2.PHASE_VALIDATING)
    seconds = sum(v - t for t, v in zip(training, validating, strict=False))
    return training[0] - running, len(training) * train_tiles / seconds


def data_path_tiles_per_s(stack: LocalStack, client: Client, training_set: str) -> tuple[float, float, float]:
    """The node's data path alone, as a job uses it, no model, in training tiles/s: (the set fetched
    into an empty disk cache, 8 threads, as a job does before its first batch when the set fits
    the cache; 2 loader processes reading each tile through that cache, decoding it and cutting
    its 128² crop with the tile's normalization measures; the same loaders fetching every tile
    from the store with no cache, as every epoch of a set larger than the cache does). A job
    takes the measures from the set's preparation and decodes no tile before its first batch;
    here they come from an untimed pass over the tiles, which gives the same figures
    (tests/integration/test_tile_measures.py). Loader start-up is not counted: it is in the
    job's seconds to the first batch."""
    from segtrain.trainer.v1 import trainer_pb2

    from segcore.metrics import IGNORE_INDEX
    from segcore.tiles import BatchStream, PreparedTiles, TileRequest, scan
    from services.common.storage import ObjectStore
    from services.trainer_svc.executor import WARM_THREADS
    from services.trainer_svc.tile_source import DiskCache, PatientStore, StoredTiles

    ts = client.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(name=training_set), timeout=60)
    tiles = [trainer_pb2.TrainingTile(name=t.name, image_uri=t.image_uri, mask_uri=t.mask_uri)
             for t in ts.tiles if not t.validation]
    store = ObjectStore(StorageSettings(endpoint=stack.s3_endpoint, access_key=stack.access_key,
                                        secret_key=SecretStr(stack.secret_key)))
    measured = scan(StoredTiles(tiles, PatientStore(store, patience_s=30)), num_classes=2, ignore_index=IGNORE_INDEX,
                    field="tiles", mode="percentile", threads=4)
    norm = measured.normalization
    assert norm is not None
    # Each training tile as the job asks for it: its 128² crop, cut by the loader.
    plan = [[TileRequest(t, 128, t) for t in range(i, min(i + 8, len(tiles)))] for i in range(0, len(tiles), 8)]

    def loader_rate(source: StoredTiles) -> float:
        stream = BatchStream(PreparedTiles(source, norm, 2, IGNORE_INDEX, measured.measures),
                             workers=2)
        batches = stream.batches(plan)
        next(batches)  # the loaders are up
        started = time.perf_counter()
        for _ in batches:
            pass
        stream.close()
        return (len(tiles) - len(plan[0])) / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as cache:
        patient = PatientStore(store, patience_s=30, cache=DiskCache(Path(cache), 2**40))
        started = time.perf_counter()
        patient.warm(tiles, threads=WARM_THREADS)
        fetching = len(tiles) / (time.perf_counter() - started)
        warm = loader_rate(StoredTiles(tiles, patient))
    cold = loader_rate(StoredTiles(tiles, PatientStore(store, patience_s=30)))
    return fetching, warm, cold


def print_table(results: list[SizeResult]) -> dict[str, object]:
    print(f"\n{'tiles':>6} {'set s':>6} {'peak PSS MB':>12} {'s to 1st batch':>15} {'train img/s':>12} "
          f"{'fetch t/s':>10} {'loader t/s':>11} {'1st epoch/model':>16} {'later/model':>12} {'uncached/model':>15}")
    for r in results:
        print(f"{r.tiles:>6} {r.set_seconds:>6.0f} {r.peak_pss_mb:>12.0f} {r.seconds_to_first_batch:>15.1f} "
              f"{r.train_images_per_s:>12.1f} {r.fetch_tiles_per_s:>10.1f} {r.warm_tiles_per_s:>11.1f} "
              f"{r.over_model(r.first_epoch_tiles_per_s):>16.1f} {r.over_model(r.warm_tiles_per_s):>12.1f} "
              f"{r.over_model(r.cold_tiles_per_s):>15.1f}")
    first, last = results[0], results[-1]
    slope = (last.peak_pss_mb - first.peak_pss_mb) / max(1, last.tiles - first.tiles)
    worst = min(r.over_model(r.first_epoch_tiles_per_s) for r in results)
    verdicts = {
        "peak": (last.peak_pss_mb, PEAK_TARGET_MB, last.peak_pss_mb <= PEAK_TARGET_MB),
        "slope_mb_per_tile": (slope, SLOPE_TARGET_MB, slope <= SLOPE_TARGET_MB),
        "first_epoch_data_over_model_min": (worst, DATA_TARGET, worst >= DATA_TARGET),
    }
    word = {True: "PASS", False: "MISS"}
    print(f"peak PSS at {last.tiles} tiles {last.peak_pss_mb:.0f} MB (target <= {PEAK_TARGET_MB:.0f}): "
          f"{word[verdicts['peak'][2]]}")
    print(f"slope {slope:.3f} MB/tile between {first.tiles} and {last.tiles} (target <= {SLOPE_TARGET_MB}): "
          f"{word[verdicts['slope_mb_per_tile'][2]]}")
    print(f"data path / model consumption, first epoch's load included, worst size {worst:.1f}x "
          f"(target >= {DATA_TARGET:.0f}x): {word[verdicts['first_epoch_data_over_model_min'][2]]}")
    return {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in verdicts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,1000,4000")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = Path("bench-output/scale")
    shutil.rmtree(out, ignore_errors=True)
    print(f"bench-scale: sizes {sizes}, {TILE}² {REGIME}, {os.cpu_count()} CPUs; rendering "
          f"{min(BASE_TILES, sizes[-1])} base tiles", flush=True)
    base = regimes.generate_regime(REGIME, min(BASE_TILES, sizes[-1]), tile_size=TILE, seed=0)
    # The node's disk cache of its own (not the system temp folder's, which outlives the stack): each
    # run starts cold.
    env = environment(given(TrainerSettings, num_threads=max(1, (os.cpu_count() or 2)),
                            tile_cache_dir=(out / "tile-cache").resolve()))
    results = []
    with LocalStack(out / "stack", trainers=1, env_overrides=env) as stack, \
            Client(stack.pipeline_address, token=stack.tokens["trainer"]) as client:
        node_pid = stack.processes["trainer-1"].popen.pid
        with Client(stack.pipeline_address, token=stack.tokens["admin"]) as admin:
            admin.pipeline.CreatePipeline(pb.CreatePipelineRequest(pipeline_id=PIPELINE, pipeline=pb.Pipeline(
                display_name="512² fluorescence", type=pb.Pipeline.TYPE_TRAINING, tile_size=TILE,
                class_names=regimes.class_names(REGIME))), timeout=60)
        for size in sizes:
            images, masks = write_set(size, base, out / f"set-{size}")
            started = time.monotonic()
            ts = client.create_training_set(f"scale-{size}", images, masks, class_names=regimes.class_names(REGIME),
                                            pipeline=PIPELINE)
            set_seconds = time.monotonic() - started
            print(f"{size} tiles: set created in {set_seconds:.0f} s; training", flush=True)
            peak, first_batch, images_per_s = train_job(client, ts.name, ts.train_tile_count, args.epochs, node_pid)
            fetching, warm, cold = data_path_tiles_per_s(stack, client, ts.name)
            results.append(SizeResult(size, set_seconds, peak, first_batch, images_per_s, fetching, warm, cold))
            print(f"{size} tiles: {asdict(results[-1])}", flush=True)
            shutil.rmtree(out / f"set-{size}")
    verdicts = print_table(results)
    summary = {"sizes": [asdict(r) for r in results], "verdicts": verdicts}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
