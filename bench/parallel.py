"""`make bench-parallel`: what data-parallel training costs and gives on this machine.

One local stack with two trainer nodes trains the same job three ways, alternating in rounds so
that the machine's load falls on all three alike:

* 1 process on 1 node (the default);
* 2 processes on 1 node (`--processes 2`; each process gets cores ÷ 2 threads);
* 1 process on each of 2 nodes (`--nodes 2`; here both nodes share this machine's cores, so this
  measures the overhead of the rendezvous and the gloo collectives over loopback, not a gain).

Per variant: training images/s of the epochs (from the node's own event times), seconds from
RUNNING to the first batch (launch, rendezvous, checking pass), the job's wall time, the peak PSS
of both trainer nodes' process trees, and the best validation mIoU. Same set, seed, global batch
and epochs for all.

    .venv/bin/python bench/parallel.py [--rounds 2] [--epochs 4] [--architecture upernet-convnextv2-atto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))

from segtrain.common.v1 import common_pb2

from bench.scale import PeakSampler, epoch_timing
from clients.names import DEFAULT_PIPELINE, TERMINAL
from clients.sdk import Client
from clients.stack import LocalStack
from segcore import synthetic

VARIANTS = {"1 process": (1, 1), "2 processes, 1 node": (2, 1), "2 nodes, 1 process each": (1, 2)}


class _TreesSampler:
    """Peak PSS of several process trees: the sum of each tree's own peak (an upper bound of their
    peak together: the trees may peak at different moments)."""

    def __init__(self, pids: list[int]) -> None:
        self._samplers = [PeakSampler(pid) for pid in pids]

    def __enter__(self) -> _TreesSampler:
        for s in self._samplers:
            s.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self._samplers:
            s.running = False
            s.join()

    @property
    def peak(self) -> float:
        return sum(s.peak for s in self._samplers)


def write_set(folder: Path, tiles: int, tile_size: int) -> tuple[Path, Path]:
    synthetic.write_tile_set(synthetic.generate_tiles(tiles, tile_size=tile_size, seed=4), folder / "tiles",
                             folder / "masks")
    return folder / "tiles", folder / "masks"


def one_job(client: Client, training_set: str, train_tiles: int, args: argparse.Namespace,
            processes: int, nodes: int, node_pids: list[int]) -> dict[str, float]:
    job = client.create_job(pipeline=DEFAULT_PIPELINE, training_set=training_set, processes=processes, nodes=nodes,
                            hyperparameters=common_pb2.Hyperparameters(
                                architecture=args.architecture, epochs=args.epochs, batch_size=8, seed=0))
    started = time.monotonic()
    with _TreesSampler(node_pids) as sampler:
        client.start_job(job.name)
        while (current := client.get_job(job.name)).state not in TERMINAL:
            time.sleep(0.3)
    if current.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{job.name} ended {current.state}: {current.failure_reason}")
    first_batch, images_per_s = epoch_timing(list(client.watch(job.name)), train_tiles)
    best = max(m.val_iou for m in client.history(job.name).epochs)
    return {"images_per_s": images_per_s, "seconds_to_first_batch": first_batch,
            "job_seconds": time.monotonic() - started, "peak_pss_mb": sampler.peak, "best_val_iou": best}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=80)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--architecture", default="upernet-convnextv2-atto")
    args = parser.parse_args()
    out = Path("bench-output/parallel")
    shutil.rmtree(out, ignore_errors=True)
    print(f"bench-parallel: {args.architecture}, {args.tiles} tiles of {args.tile_size}², batch 8, "
          f"{args.epochs} epochs, {args.rounds} rounds, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with LocalStack(out / "stack", trainers=2, env_overrides={"SEGTRAIN_TRAINER_DATA_WORKERS": "0"}) as stack, \
            Client(stack.pipeline_address, token=stack.tokens["trainer"]) as client:
        pids = [stack.processes[f"trainer-{i}"].popen.pid for i in (1, 2)]
        images, masks = write_set(out / "set", args.tiles, args.tile_size)
        ts = client.create_training_set("parallel", images, masks, class_names=synthetic.CLASS_NAMES)
        for round_ in range(args.rounds):
            for name, (processes, nodes) in VARIANTS.items():
                results[name].append(one_job(client, ts.name, ts.train_tile_count, args, processes, nodes, pids))
                print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    base = summary["1 process"]["images_per_s"]
    print(f"\n{'variant':26} {'img/s':>7} {'vs 1':>6} {'s to 1st batch':>15} {'job s':>7} {'peak PSS MB':>12} "
          f"{'best mIoU':>10}")
    for name, s in summary.items():
        print(f"{name:26} {s['images_per_s']:7.1f} {s['images_per_s'] / base:6.2f} {s['seconds_to_first_batch']:15.1f} "
              f"{s['job_seconds']:7.1f} {s['peak_pss_mb']:12.0f} {s['best_val_iou']:10.3f}")
    (out / "results.json").write_text(json.dumps({"median": summary, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
