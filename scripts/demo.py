"""`make demo`: the whole workflow on a fresh machine, through the `segtrain` CLI.

Generates a realistic sample set, starts the local stack (S3 server, three services, one trainer
node) as processes, then runs the seven steps of the workflow: list pipelines, create a job on a
training set, configure it, start it, watch it live, find the registered model, analyse held-back
tiles; then exports the model for transformers. Writes the loss/IoU graphs, the masks and the
export to demo-output/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from clients.cli.main import main as segtrain
from clients.names import DEFAULT_PIPELINE
from clients.stack import LocalStack
from segcore import synthetic

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> int:
    print(f"\n$ segtrain {shlex.join(argv)}", flush=True)
    code = segtrain(list(argv))
    if code != 0:
        raise SystemExit(f"segtrain {argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({code})")
    return code


def capture(*argv: str) -> dict:  # type: ignore[type-arg]
    """Runs a verb with --json and returns its object (also shows the command)."""
    print(f"\n$ segtrain {shlex.join(argv)} --json", flush=True)
    out = subprocess.run([sys.executable, "-m", "clients.cli.main", *argv, "--json"], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--tiles", type=int, default=72, help="tiles to generate (8 are held back)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--architecture", default="upernet-convnext-cpu")
    args = parser.parse_args()
    started = time.monotonic()
    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"

    tiles = synthetic.generate_tiles(args.tiles, tile_size=128, seed=7)
    train_tiles, held_back = tiles[:-8], tiles[-8:]
    synthetic.write_tile_set(train_tiles, data / "tiles", data / "masks")
    synthetic.write_tile_set(held_back, data / "new-tiles", data / "new-tiles-truth")
    print(f"Generated {len(train_tiles)} annotated tiles (+{len(held_back)} held back) in {data}")

    with LocalStack(out / "stack") as stack:
        import os

        os.environ["SEGTRAIN_ADDRESS"] = stack.pipeline_address
        os.environ["SEGTRAIN_TOKEN"] = stack.tokens["trainer"]  # every call is authenticated
        print(f"Stack up: pipeline {stack.pipeline_address}, metrics {stack.metrics_address}, "
              f"S3 {stack.s3_endpoint}; logs in {stack.logs}")
        run("pipelines", "list")                                             # 1. select a pipeline
        run("architectures", "list")
        run("sets", "create", "demo-cells", "--tiles", str(data / "tiles"), "--masks", str(data / "masks"),
            "--classes", ",".join(synthetic.CLASS_NAMES), "--group-by", r"^(.*)_tile")
        job = capture("jobs", "create", "--pipeline", DEFAULT_PIPELINE, "--training-set", "demo-cells",  # 2.+3.
                      "--architecture", args.architecture, "--epochs", str(args.epochs), "--batch-size", "8",
                      "--learning-rate", "0.01")["name"]
        print(job)
        run("jobs", "start", job)                                            # 4. start training
        segtrain(["jobs", "watch", job])                                     # 5. monitor, live
        run("jobs", "get", job)
        run("jobs", "chart", job, "--out", str(out / "charts"))
        run("models", "list")                                                # 6. the completed model
        model = capture("jobs", "get", job)["model"]
        run("analyze", "--model", model, "--tiles", str(data / "new-tiles"), "--out", str(out / "masks"))  # 7.
        run("models", "export", model, "--format", "hf", "--out", str(out / "model-hf"))  # for other tools
    print(f"\nDone in {time.monotonic() - started:.0f} s. Everything is in {out}:")
    print(f"  charts:   {out / 'charts'}\n  masks:    {out / 'masks'} (truth: {data / 'new-tiles-truth'})")
    print(f"  model:    {out / 'model-hf'} (transformers' from_pretrained loads it; see the README's Model export)")
    print(f"  logs:     {out / 'stack' / 'logs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
