"""The control plane under what hostile or careless clients open at once (loopback, bounded): 256
unauthenticated health Watch streams, 600 viewer watches of jobs that do not exist and 64
AnalyzeTiles calls whose clients give up after a second. Meanwhile authenticated calls answer in
under a second, node heartbeats keep the node alive and a job trains to the end; once the
clients leave, the services keep no more threads than their bounded pools hold and no more
database files than their SQL pools hold, their other open files are back to where they were, and
a second round adds none."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.pipeline.v1 import pipeline_pb2_grpc

from clients.sdk import Client
from clients.stack import LocalStack
from tests.e2e.conftest import wait_for_state
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e
S = common_pb2
HEALTH_WATCHES, UNKNOWN_WATCHES, ABANDONED_ANALYSES = 256, 600, 64
CLASSES = ["background", "nucleus", "debris"]
# Threads the services' blocking pools may keep idle (SEGTRAIN_BLOCKING_THREADS + _RESERVED_THREADS).
POOLS = 16 + 4
# Database files the SQL connection pool may keep open: up to 15 SQLite connections with the
# database and its WAL each, and the shared-memory index once per process.
POOLED_FILES = 15 * 2 + 1


class Usage(NamedTuple):
    threads: int
    files: frozenset[str]  # open descriptors other than the pool's database files, as fd->target
    pooled: int  # open descriptors of the SQL pool's database files

    @classmethod
    def of(cls, pid: int, database_dir: Path) -> Usage:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        files, pooled = set(), 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink()
            except OSError:  # closed while listing
                continue
            if target.parent == database_dir:
                pooled += 1
            else:
                files.add(f"{fd.name}->{target}")
        return cls(threads, frozenset(files), pooled)


def _settled(pid: int, database_dir: Path, baseline: Usage, timeout: float = 15) -> Usage:
    """Usage once the open files (other than the pool's) are back to `baseline` plus a few closing
    sockets, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        now = Usage.of(pid, database_dir)
        if len(now.files) <= len(baseline.files) + 4 or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


class HostileLoad:
    """What the clients open at once; `close` checks how each was answered and closes it all."""

    def __init__(self, stack: LocalStack, model: str, image_key: str) -> None:
        self.channels = [grpc.insecure_channel(stack.pipeline_address) for _ in range(8)]
        self.metrics_channels = [grpc.insecure_channel(stack.metrics_address) for _ in range(6)]
        viewer = [("authorization", f"Bearer {stack.tokens['viewer']}")]
        trainer = [("authorization", f"Bearer {stack.tokens['trainer']}")]
        self.health = [health_pb2_grpc.HealthStub(self.channels[i % 8]).Watch(health_pb2.HealthCheckRequest())
                       for i in range(HEALTH_WATCHES)]
        self.unknown = [metrics_pb2_grpc.MetricsServiceStub(self.metrics_channels[i % 6]).WatchJobEvents(
            metrics_pb2.WatchJobEventsRequest(job=f"jobs/j-nothing-{i}"), metadata=viewer)
            for i in range(UNKNOWN_WATCHES)]
        self.analyses = [pipeline_pb2_grpc.PipelineServiceStub(self.channels[i % 8]).AnalyzeTiles.future(
            pb.AnalyzeTilesRequest(model=model, image_keys=[image_key]), metadata=trainer, timeout=1.0)
            for i in range(ABANDONED_ANALYSES)]

    def close(self) -> None:
        try:
            for call in self.unknown:  # each answered once its grace passed, none left waiting
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
            codes = []
            for future in self.analyses:
                try:
                    future.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            # Most never started (the long-call limit: 8 at once; a call that ends lets the next
            # in); those that did finished or were stopped at their deadline.
            assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.OK}, set(codes)
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= ABANDONED_ANALYSES // 2
            # The per-host limit of open streams refused the rest at once.
            refused = sum(1 for stream in self.health
                          if stream.done() and stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert refused >= HEALTH_WATCHES - 32
            for stream in self.health:
                stream.cancel()
        finally:
            for channel in self.channels + self.metrics_channels:
                channel.close()


def test_hostile_clients_starve_nothing_and_leave_nothing(client: Client, stack: LocalStack, tmp_path: Path
                                                          ) -> None:
    tiles, masks = write_sample_set(tmp_path / "set", count=8, tile_size=64, seed=12)
    training_set = client.create_training_set("e2e-hostile", tiles, masks, class_names=CLASSES)
    params = S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1, batch_size=4)
    first = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=params)
    client.start_job(first.name)
    model = wait_for_state(client, first.name, {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}, 300).model
    assert model, "the first job trained no model"
    image_key = client.upload([sorted(tiles.iterdir())[0]]).popitem()[1]
    pids = {name: stack.processes[name].popen.pid for name in ("pipeline", "metrics")}
    database_dir = stack.root / "db"
    time.sleep(1.0)
    baseline = {name: Usage.of(pid, database_dir) for name, pid in pids.items()}

    load = HostileLoad(stack, model, image_key)
    try:
        job = client.create_job(pipeline="segmentation", training_set=training_set.name,
                                hyperparameters=S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=3,
                                                                  batch_size=4))
        client.start_job(job.name)
        with Client(stack.pipeline_address, token=stack.tokens["admin"]) as admin:
            slowest = 0.0
            while (current := client.get_job(job.name)).state not in {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}:
                for call in (lambda: client.list_pipelines(), lambda: client.get_job(job.name),
                             lambda: admin.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest(), timeout=5)):
                    started = time.perf_counter()
                    call()
                    slowest = max(slowest, time.perf_counter() - started)
                nodes = admin.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest(), timeout=5).trainer_nodes
                assert all(n.state == pb.TrainerNode.STATE_READY for n in nodes), [n.state for n in nodes]
                time.sleep(0.2)
        assert current.state == S.JOB_STATE_SUCCEEDED, current.failure_reason
        assert slowest < 1.0, f"an authenticated call took {slowest:.2f} s under load"
    finally:
        load.close()
    after_first = {name: _settled(pid, database_dir, baseline[name]) for name, pid in pids.items()}
    # Once more, to tell a leak from what bounded pools keep (idle executor threads, pooled SQLite
    # connections with their files): no other file may stay open from one round to the next.
    HostileLoad(stack, model, image_key).close()
    for name, pid in pids.items():
        first, after = after_first[name], _settled(pid, database_dir, after_first[name])
        assert len(after.files) <= len(first.files) + 4, \
            f"{name} files grow per round: {sorted(after.files - first.files)}"
        assert len(after.files) <= len(baseline[name].files) + 4, \
            f"{name} keeps files open: {sorted(after.files - baseline[name].files)}"
        assert after.pooled <= POOLED_FILES, f"{name} keeps {after.pooled} database files open"
        # Threads cannot be told apart like files: the pools start theirs on demand, so a round
        # may add some until they are full; beyond the pools' size, a thread was left behind.
        assert after.threads <= baseline[name].threads + POOLS, \
            f"{name} threads beyond its pools: {baseline[name].threads} -> {first.threads} -> {after.threads}"
