"""Load test (bounded, loopback only): jobs queued on trainer nodes while many clients watch them,
optionally across replicas of the pipeline and metrics services.

Every job must reach a terminal state, every watcher must receive its job's whole log (gap-free,
no duplicate), and no RPC may fail unexpectedly. Watchers run in `--watcher-processes` client
processes (threads there, a client each), so one Python process is not the bottleneck. Prints a
summary and writes bench-output/load.json.

    .venv/bin/python bench/load_test.py [--jobs 20] [--watchers 200] [--nodes 2]
    .venv/bin/python bench/load_test.py --jobs 50 --nodes 4 --watchers 1000 \
        --pipeline-replicas 2 --metrics-replicas 2 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

With --database-url, a fresh database is created from it for the run (and dropped after).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segtrain.common.v1 import common_pb2  # noqa: E402
from segtrain.pipeline.v1 import pipeline_pb2 as pb  # noqa: E402

from bench.databases import fresh_postgres  # noqa: E402
from clients.names import DEFAULT_PIPELINE, TERMINAL  # noqa: E402
from clients.sdk import Client  # noqa: E402
from clients.stack import LocalStack  # noqa: E402
from segcore import synthetic  # noqa: E402
from services.common.settings import PipelineSettings, TrainerSettings, environment, given  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--watcher-processes", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pipeline-replicas", type=int, default=1)
    parser.add_argument("--metrics-replicas", type=int, default=1)
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL to create a fresh database from (default: SQLite files)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the test gives up")
    args = parser.parse_args()
    env = environment(given(TrainerSettings, num_threads=1), given(PipelineSettings, heartbeat_interval_s=2))
    with tempfile.TemporaryDirectory() as tmp, _database(args.database_url) as url, LocalStack(
            Path(tmp) / "stack", trainers=args.nodes, env_overrides=env, pipeline_replicas=args.pipeline_replicas,
            metrics_replicas=args.metrics_replicas, database_url=url) as stack:
        return run(stack, Path(tmp), args)


@contextmanager
def _database(admin_url: str | None) -> Iterator[str | None]:
    if admin_url is None:
        yield None
        return
    with fresh_postgres(admin_url, "segtrain_load") as url:
        yield url


def run(stack: LocalStack, tmp: Path, args: argparse.Namespace) -> int:
    driver = Client(stack.pipeline_address, token=stack.tokens["trainer"])
    _wait_for_nodes(Client(stack.pipeline_address, token=stack.tokens["admin"]), args.nodes)
    training_set = _create_training_set(driver, tmp)
    started = time.monotonic()
    jobs = _queue_jobs(driver, training_set, args.jobs, args.epochs)
    errors: list[str] = []
    # Watcher i watches jobs[i % len(jobs)]; process p runs watchers p, p + P, p + 2P...
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.watcher_processes) as pool:
        pending = pool.starmap_async(watch_many, [
            (stack.pipeline_address, stack.tokens["viewer"], [(i, jobs[i % len(jobs)]) for i in
                                                                  range(p, args.watchers, args.watcher_processes)])
            for p in range(args.watcher_processes)])
        states = poll_until_terminal(driver, jobs, started + args.timeout, errors)
        results = pending.get(max(1.0, started + args.timeout - time.monotonic()))
    wall = time.monotonic() - started
    received: dict[int, list[int]] = {}
    for part in results:
        for index, outcome in part.items():
            if isinstance(outcome, str):
                errors.append(f"watcher {index}: {outcome}")
            else:
                received[index] = outcome
    logs = {name: [e.seq for e in driver.watch(name)] for name in jobs}
    complete = {name: seqs == list(range(1, len(seqs) + 1)) for name, seqs in logs.items()}
    broken = [i for i in range(args.watchers)
              if received.get(i) != logs[jobs[i % len(jobs)]] or not complete[jobs[i % len(jobs)]]]
    summary = {
        "jobs": args.jobs, "nodes": args.nodes, "watchers": args.watchers,
        "watcher_processes": args.watcher_processes, "epochs_per_job": args.epochs,
        "pipeline_replicas": args.pipeline_replicas, "metrics_replicas": args.metrics_replicas,
        "database": "postgresql" if args.database_url else "sqlite",
        "wall_s": round(wall, 1), "jobs_per_min": round(60 * args.jobs / wall, 1),
        "final_states": {common_pb2.JobState.Name(s): list(states.values()).count(s) for s in set(states.values())},
        "watchers_complete": args.watchers - len(broken), "events_per_job": sorted({len(v) for v in logs.values()}),
        "unexpected_errors": errors[:10], "error_count": len(errors),
    }
    ok = (not errors and not broken and len(states) == args.jobs
          and all(s == common_pb2.JOB_STATE_SUCCEEDED for s in states.values()))
    summary["pass"] = ok
    _report(summary)
    return 0 if ok else 1


def watch_many(address: str, token: str, assignments: list[tuple[int, str]]) -> dict[int, list[int] | str]:
    """In a client process (a web app's backend, say): one client, one thread per (watcher index,
    job); each watcher's received seqs, or what went wrong."""
    outcome: dict[int, list[int] | str] = {}
    client = Client(address, token=token)

    def watch(index: int, job: str) -> None:
        try:
            outcome[index] = [e.seq for e in client.watch(job)]
        except Exception as exc:  # recorded, reported as a failure
            outcome[index] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=watch, args=pair, daemon=True) for pair in assignments]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        client.close()
    return outcome


def _wait_for_nodes(admin: Client, count: int, timeout_s: float = 600) -> None:
    """Until `count` trainer nodes are READY (the load starts on a deployment already up: on these
    2 cores, a node starting under 1,000 watchers takes minutes to probe its device)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = admin.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest(), timeout=30).trainer_nodes
        if sum(n.state == pb.TrainerNode.STATE_READY for n in nodes) >= count:
            admin.close()
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} trainer nodes registered in {timeout_s:.0f} s")
        time.sleep(0.5)


def _create_training_set(driver: Client, tmp: Path) -> pb.TrainingSet:
    tiles = synthetic.generate_tiles(16, tile_size=64, seed=1)
    synthetic.write_tile_set(tiles, tmp / "tiles", tmp / "masks")
    return driver.create_training_set("load", tmp / "tiles", tmp / "masks", class_names=synthetic.CLASS_NAMES)


def _queue_jobs(driver: Client, training_set: pb.TrainingSet, count: int, epochs: int) -> list[str]:
    """Creates and starts `count` jobs at once (the nodes take them in turn); their names."""
    jobs = []
    for i in range(count):
        job = driver.create_job(pipeline=DEFAULT_PIPELINE, training_set=training_set.name, request_id=f"load-{i}",
                                hyperparameters=common_pb2.Hyperparameters(
                                    architecture="upernet-convnext-cpu", epochs=epochs, batch_size=4))
        driver.start_job(job.name)
        jobs.append(job.name)
    return jobs


def _report(summary: dict[str, object]) -> None:
    """Prints the summary and writes it to bench-output/load.json."""
    print(json.dumps(summary, indent=2))
    out = ROOT / "bench-output"
    out.mkdir(exist_ok=True)
    (out / "load.json").write_text(json.dumps(summary, indent=2))


def poll_until_terminal(client: Client, jobs: list[str], deadline: float, errors: list[str]) -> dict[str, int]:
    states: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            states = {name: client.get_job(name).state for name in jobs}
        except Exception as exc:
            errors.append(f"GetJob: {type(exc).__name__}: {exc}")
        if states and all(s in TERMINAL for s in states.values()):
            break
        time.sleep(1.0)
    return states


if __name__ == "__main__":
    raise SystemExit(main())
