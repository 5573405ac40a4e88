"""Replicas over one PostgreSQL database: two pipeline replicas, two metrics replicas and two
trainer nodes as separate processes, every client and node given the list of replicas. SIGKILL of
the pipeline replica following a job and of a metrics replica mid-job loses no job and no event:
the other pipeline replica takes the job's relay over, watchers resume on the other metrics
replica, and each epoch is in the history once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from segtrain.common.v1 import common_pb2

from clients.sdk import Client
from clients.stack import LocalStack
from tests.conftest import fresh_postgres_database, postgres_reachable
from tests.e2e.conftest import wait_for_state
from tests.e2e.test_faults import start_job

pytestmark = pytest.mark.e2e
LEASE_S = 2.0
WATCHERS = 4


@pytest.fixture
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, str]]:
    reason = postgres_reachable()
    if reason:
        pytest.skip(reason)
    with fresh_postgres_database() as url, LocalStack(
            tmp_path_factory.mktemp("replicas"), trainers=2, pipeline_replicas=2, metrics_replicas=2,
            database_url=url, env_overrides={
                "SEGTRAIN_TRAINER_NUM_THREADS": "1", "SEGTRAIN_PIPELINE_HEARTBEAT_INTERVAL_S": "1",
                "SEGTRAIN_PIPELINE_SCHEDULE_INTERVAL_S": "0.3", "SEGTRAIN_METRICS_HEARTBEAT_INTERVAL_S": "0.5",
                "SEGTRAIN_PIPELINE_RELAY_LEASE_S": str(LEASE_S)}) as stack:
        yield stack, url


def relay_owner(database_url: str, job: str) -> str:
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(sqlalchemy.text("SELECT relay_owner FROM jobs WHERE id = :id"),
                                          {"id": job.rsplit("/", 1)[1]}).scalar())
    finally:
        engine.dispose()


def test_sigkill_of_a_pipeline_and_a_metrics_replica_mid_job_loses_nothing(
        replicated: tuple[LocalStack, str], tmp_path: Path) -> None:
    stack, url = replicated
    assert stack.pipeline_address.count(",") == 1 and stack.metrics_address.count(",") == 1
    client, name = start_job(stack, tmp_path, "replicas", tiles=16, epochs=10, seed=6)
    # Watchers of their own, spread over both metrics replicas by their channels.
    watchers = [Client(stack.pipeline_address, token=stack.tokens["viewer"]) for _ in range(WATCHERS)]
    seen: list[list[common_pb2.JobEvent]] = [[] for _ in watchers]
    threads = [threading.Thread(target=lambda w=w, s=s: s.extend(w.watch(name)), daemon=True)
               for w, s in zip(watchers, seen, strict=True)]
    for thread in threads:
        thread.start()
    wait_for_state(client, name, {common_pb2.JOB_STATE_RUNNING}, 120)
    while client.get_job(name).latest_metrics.epoch < 2:
        time.sleep(0.05)
    owner = relay_owner(url, name)
    assert owner in ("pipeline", "pipeline-2"), owner
    stack.kill(owner)  # the replica following the job: no lease given back
    stack.kill("metrics")
    killed_at = time.monotonic()
    # The survivor takes the relay over once the lease lapses, and the job goes on.
    while relay_owner(url, name) == owner and time.monotonic() - killed_at < 30:
        time.sleep(0.1)
    assert relay_owner(url, name) not in ("", owner), "the relay was not taken over"
    print(f"relay taken over {time.monotonic() - killed_at:.2f} s after the kill (lease {LEASE_S} s)")

    done = wait_for_state(client, name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    full = list(client.watch(name))
    reasons = [e.state_change.reason for e in full if e.HasField("state_change")]
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.attempt == 1, (done.failure_reason, reasons)
    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    for thread, events in zip(threads, seen, strict=True):
        thread.join(30)
        assert [e.seq for e in events] == [e.seq for e in full], "every watcher gets the whole log, once"
    epochs = [e.epoch_metrics.epoch for e in full if e.HasField("epoch_metrics")]
    assert epochs == list(range(1, 11)), "each epoch's event once in the log"
    assert [m.epoch for m in client.history(name).epochs] == list(range(1, 11)), "each epoch once"
    for watcher in watchers:
        watcher.close()
    client.close()
