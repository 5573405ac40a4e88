"""Control-plane rates with 1 and 2 replicas, side by side in one run, on PostgreSQL.

For each replica count a fresh database and a local stack (`--pipeline-replicas R
--metrics-replicas R`, no real trainer) are started; fake trainer nodes in this process accept
every RunJob at once and stream `--events` progress events per job as fast as the relay reads
them. Measured:
* scheduling rate: jobs assigned per second, from the nodes' registration (every job already
  QUEUED) to the last RunJob the nodes received;
* relay rate: events stored in the metrics log per second, from the first RunJob until every
  job's events are stored (node -> relay -> AppendJobEvents -> log).

    .venv/bin/python bench/replicas.py [--jobs 64] [--nodes 8] [--events 100] [--database-url URL]

Writes bench-output/replicas.json. On this 2-core machine every process (PostgreSQL, the
replicas, the fake nodes) shares the two cores: the ratio says what a second replica gives when
CPU is not added with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import sqlalchemy  # noqa: E402
from segtrain.common.v1 import common_pb2  # noqa: E402
from segtrain.pipeline.v1 import pipeline_pb2 as pb  # noqa: E402
from segtrain.pipeline.v1 import pipeline_pb2_grpc  # noqa: E402
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc  # noqa: E402

from bench.databases import fresh_postgres  # noqa: E402
from clients import addresses, names  # noqa: E402
from clients.names import DEFAULT_PIPELINE  # noqa: E402
from clients.sdk import Client  # noqa: E402
from clients.stack import LocalStack  # noqa: E402
from segcore import synthetic  # noqa: E402
from services.common.tokens import node_token, parse_node_key  # noqa: E402

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class FastNode(trainer_pb2_grpc.TrainerServiceServicer):
    """Accepts every RunJob at once and streams `events` progress events per attempt."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.accepted: dict[str, float] = {}  # job -> when RunJob came
        self.lock = threading.Lock()

    def RunJob(self, request: trainer_pb2.RunJobRequest, context: grpc.ServicerContext
               ) -> trainer_pb2.RunJobResponse:
        with self.lock:
            self.accepted.setdefault(request.job, time.monotonic())
        return trainer_pb2.RunJobResponse()

    def WatchJobRun(self, request: trainer_pb2.WatchJobRunRequest, context: grpc.ServicerContext
                    ) -> Iterator[trainer_pb2.WatchJobRunResponse]:
        for seq in range(request.after_source_seq + 1, self.events + 1):
            yield trainer_pb2.WatchJobRunResponse(event=common_pb2.JobEvent(
                job=request.job, attempt=request.attempt, source_seq=seq,
                batch_progress=common_pb2.BatchProgress(epoch=1, batch=seq, batches=self.events, loss=1.0)))
        while context.is_active():
            time.sleep(0.1)

    def CancelJobRun(self, request: trainer_pb2.CancelJobRunRequest, context: grpc.ServicerContext
                     ) -> trainer_pb2.CancelJobRunResponse:
        return trainer_pb2.CancelJobRunResponse()


@contextmanager
def fake_nodes(stack: LocalStack, count: int, capacity: int, events: int) -> Iterator[list[FastNode]]:
    """`count` FastNodes, registered (each with its own node token) and heartbeating."""
    key = parse_node_key(stack.node_key)
    target = addresses.parse(stack.pipeline_address)
    nodes, servers, stopping, beats = [], [], threading.Event(), []
    for index in range(count):
        node_id = f"fast-{index}"
        fake = FastNode(events)
        server = grpc.server(futures.ThreadPoolExecutor(capacity + 4))
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(target.target, options=target.options)
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        metadata = (("authorization", f"Bearer {node_token(key, node_id)}"),)
        stub.RegisterTrainerNode(pb.RegisterTrainerNodeRequest(
            node_id=node_id, address=f"127.0.0.1:{port}", capacity=capacity, device="cpu",
            job_memory_bytes=64 * 2**30, max_processes=1), timeout=10, metadata=metadata)

        def beat(stub: pipeline_pb2_grpc.PipelineServiceStub = stub, fake: FastNode = fake,
                 node_id: str = node_id, metadata: tuple[tuple[str, str], ...] = metadata) -> None:
            while not stopping.wait(0.5):
                with suppress(grpc.RpcError):
                    stub.HeartbeatTrainerNode(pb.HeartbeatTrainerNodeRequest(
                        name=names.trainer_node(node_id), jobs=list(fake.accepted)), timeout=10, metadata=metadata)
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        nodes.append(fake)
        servers.append((server, channel))
        beats.append(thread)
    try:
        yield nodes
    finally:
        stopping.set()
        for thread in beats:
            thread.join(5)
        for server, channel in servers:
            channel.close()
            server.stop(0).wait()


def measure(replicas: int, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    env = {"SEGTRAIN_PIPELINE_SCHEDULE_INTERVAL_S": "0.2", "SEGTRAIN_PIPELINE_HEARTBEAT_INTERVAL_S": "2",
           "SEGTRAIN_LOG_LEVEL": "WARNING", "SEGTRAIN_PIPELINE_MAX_ACTIVE_JOBS_PER_PRINCIPAL": "100000"}
    with fresh_postgres(args.database_url) as url, LocalStack(
            tmp / f"stack-{replicas}", trainers=0, pipeline_replicas=replicas, metrics_replicas=replicas,
            database_url=url, env_overrides=env) as stack:
        client = Client(stack.pipeline_address, token=stack.tokens["trainer"])
        tiles = synthetic.generate_tiles(8, tile_size=64, seed=1)
        synthetic.write_tile_set(tiles, tmp / "tiles", tmp / "masks")
        training_set = client.create_training_set("rates", tmp / "tiles", tmp / "masks",
                                                  class_names=synthetic.CLASS_NAMES)
        jobs = []
        for index in range(args.jobs):
            job = client.create_job(pipeline=DEFAULT_PIPELINE, training_set=training_set.name,
                                    request_id=f"rate-{index}", hyperparameters=common_pb2.Hyperparameters(
                                        architecture="upernet-convnext-cpu", epochs=1, batch_size=4))
            client.start_job(job.name)
            jobs.append(job.name)
        engine = sqlalchemy.create_engine(url)
        try:
            with fake_nodes(stack, args.nodes, -(-args.jobs // args.nodes), args.events) as nodes:
                registered = time.monotonic()
                deadline = registered + args.timeout
                while sum(len(n.accepted) for n in nodes) < args.jobs and time.monotonic() < deadline:
                    time.sleep(0.01)
                accepted = [t for n in nodes for t in n.accepted.values()]
                assigned = max(accepted) if len(accepted) == args.jobs else float("nan")
                wanted = args.jobs * args.events
                stored = 0
                while time.monotonic() < deadline:
                    with engine.connect() as connection:
                        stored = int(connection.execute(sqlalchemy.text(
                            "SELECT count(*) FROM job_events WHERE kind = 'batch_progress'")).scalar() or 0)
                    if stored >= wanted:
                        break
                    time.sleep(0.05)
                relayed = time.monotonic()
        finally:
            engine.dispose()
            client.close()
        first = min(accepted) if accepted else registered
        return {
            "replicas": replicas, "jobs": args.jobs, "nodes": args.nodes, "events_per_job": args.events,
            "jobs_assigned": len(accepted), "assign_s": round(assigned - registered, 2),
            "jobs_assigned_per_s": round(args.jobs / (assigned - registered), 1),
            "events_stored": stored, "relay_s": round(relayed - first, 2),
            "events_relayed_per_s": round(stored / (relayed - first), 0),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--events", type=int, default=100, help="progress events each job's node streams")
    parser.add_argument("--rounds", type=int, default=2, help="alternating 1- and 2-replica runs")
    parser.add_argument("--database-url", default=DEFAULT_POSTGRES,
                        help="a PostgreSQL database to create the benchmark's databases from")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for replicas in (1, 2):
                row = measure(replicas, args, Path(tmp) / f"round-{round_}")
                row["round"] = round_ + 1
                print(json.dumps(row), flush=True)
                rows.append(row)
    ok = all(r["jobs_assigned"] == args.jobs and r["events_stored"] == args.jobs * args.events for r in rows)
    summary: dict[str, object] = {"rows": rows, "complete": ok}
    for key in ("jobs_assigned_per_s", "events_relayed_per_s"):
        median = {n: statistics.median(float(r[key]) for r in rows if r["replicas"] == n)  # type: ignore[arg-type]
                  for n in (1, 2)}
        summary[f"{key}_median"] = {n: round(v, 1) for n, v in median.items()}
        summary[f"{key}_ratio_2_vs_1"] = round(median[2] / median[1], 2)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    out = ROOT / "bench-output"
    out.mkdir(exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
