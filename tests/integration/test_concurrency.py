"""Job state changes under concurrency, on SQLite and on PostgreSQL: a cancel racing the final
event, a cancel racing an assignment, and two schedulers over one database, each many times over
with the racers released together. Invariants: no lost update (every job ends where one of the
serial orders would leave it), no skipped or doubled `control_seq`, no job stuck outside a
terminal state, no job assigned twice, no node given more jobs than its capacity."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial

import pytest
import sqlalchemy
from segtrain.common.v1 import common_pb2
from sqlmodel import col, select

from services.common import job_states
from services.common.database import make_engine, session_scope
from services.common.errors import FailedPreconditionError
from services.pipeline_svc.resources import hyperparameters, jobs, lifecycle, pipelines
from services.pipeline_svc.runtime.job_relay import JobRelay
from services.pipeline_svc.runtime.scheduler import Claim, Scheduler
from services.pipeline_svc.tables import (
    SCHEMA,
    JobRow,
    OutboxRow,
    PipelineRow,
    TileRow,
    TrainerNodeRow,
    TrainingSetRow,
)

S = common_pb2
ITERATIONS = 40


@pytest.fixture
def engine(database_url: str) -> Iterator[sqlalchemy.engine.Engine]:
    engine = make_engine(database_url, SCHEMA)
    with session_scope(engine) as session:
        pipelines.seed_pipelines(session)
        session.add(TrainingSetRow(id="ts", display_name="ts", pipeline="segmentation", class_names=["a", "b"],
                                   snapshot="sha256:0", tile_count=2, train_tile_count=1, validation_tile_count=1,
                                   validation_fraction=0.2, split_seed=0, report=b""))
        session.flush()  # the set before its tiles
        for name, validation in (("t1", False), ("t2", True)):
            session.add(TileRow(training_set="ts", name=name, image_uri=f"training-sets/ts/images/{name}.png",
                                mask_uri=f"training-sets/ts/masks/{name}.png", source_image=name, width=64, height=64,
                                validation=validation))
    yield engine
    engine.dispose()


def add_nodes(engine: sqlalchemy.engine.Engine, count: int, capacity: int) -> None:
    with session_scope(engine) as session:
        for i in range(count):
            session.add(TrainerNodeRow(id=f"n{i}", address=f"127.0.0.1:{7000 + i}", state=READY, capacity=capacity,
                                       device="cpu", job_memory_bytes=64 * 2**30, max_processes=4))


READY = 1  # pb.TrainerNode.STATE_READY


def add_job(engine: sqlalchemy.engine.Engine, job_id: str, **fields: object) -> None:
    with session_scope(engine) as session:
        pipeline = session.get(PipelineRow, "segmentation")
        assert pipeline is not None
        effective = hyperparameters.effective(pipelines.stored_hyperparameters(pipeline),
                                              {"architecture": "upernet-convnext-cpu", "batch_size": 2})
        session.add(JobRow(id=job_id, pipeline="segmentation", training_set="ts",
                           hyperparameters=hyperparameters.serialized(effective), **fields))


def race(*racers: Callable[[], object]) -> list[object]:
    """Runs the racers in threads released together; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(racers))
    results: list[object] = [None] * len(racers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = racers[i]()
        except Exception as exc:  # the test judges each outcome
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(racers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def control_seqs_are_whole(engine: sqlalchemy.engine.Engine) -> None:
    """Each job's control events are numbered 1..control_seq, each once."""
    with session_scope(engine) as session:
        recorded = {job.id: job.control_seq for job in session.exec(select(JobRow))}
        seqs: dict[str, list[int]] = {job_id: [] for job_id in recorded}
        for payload in session.exec(select(OutboxRow.payload)):
            event = S.JobEvent.FromString(payload)
            seqs[event.job.removeprefix("jobs/")].append(event.source_seq)
    for job_id, control_seq in recorded.items():
        assert sorted(seqs[job_id]) == list(range(1, control_seq + 1)), (job_id, seqs[job_id], control_seq)


def cancel(engine: sqlalchemy.engine.Engine, job_id: str) -> int:
    with session_scope(engine, serialized=True) as session:
        job, _ = jobs.request_cancel(session, name=f"jobs/{job_id}", stop_early=False, caller=None)
        return job.state


def scheduler(engine: sqlalchemy.engine.Engine) -> Scheduler:
    # Claims only: RunJob is never sent (no peers, no store), nor a relay started.
    return Scheduler(engine, None, None, interval_s=1, heartbeat_interval_s=1, max_attempts=5,  # type: ignore[arg-type]
                     stopping=threading.Event(), wake_outbox=lambda: None)


def test_a_cancel_racing_the_final_event_never_leaves_the_job_cancelling(engine: sqlalchemy.engine.Engine) -> None:
    add_nodes(engine, 1, capacity=ITERATIONS)
    for i in range(ITERATIONS):
        job_id = f"j-{i}"
        add_job(engine, job_id, state=S.JOB_STATE_RUNNING, attempt=1, trainer_node="n0")
        relay = JobRelay(engine, None, None, job_id=job_id, max_attempts=5,  # type: ignore[arg-type]
                         stopping=threading.Event(), wake_outbox=lambda: None, on_exit=lambda job_id: None)
        final = S.JobEvent(job=f"jobs/{job_id}", attempt=1, source_seq=1,
                           finished=S.JobFinished(state=S.JOB_STATE_FAILED, reason="out of memory"))
        cancelled, finished = race(partial(cancel, engine, job_id), partial(relay._apply, [final]))
        assert finished is True, finished
        # Either order is fine: cancel first (CANCELLING, then the end), or the end first (the
        # cancel is then refused); neither may be lost.
        assert cancelled == S.JOB_STATE_CANCELLING or isinstance(cancelled, FailedPreconditionError), cancelled
        with session_scope(engine) as session:
            job = session.get(JobRow, job_id)
            assert job is not None and job.state == S.JOB_STATE_FAILED, job_states.state_name(job.state)  # type: ignore[union-attr]
            assert job.control_seq == (2 if cancelled == S.JOB_STATE_CANCELLING else 1)
    control_seqs_are_whole(engine)


def test_a_cancel_racing_an_assignment_either_wins_or_stops_the_run(engine: sqlalchemy.engine.Engine) -> None:
    add_nodes(engine, 1, capacity=1)
    outcomes: Counter[str] = Counter()
    for i in range(ITERATIONS):
        job_id = f"j-{i}"
        add_job(engine, job_id, state=S.JOB_STATE_QUEUED)
        one = scheduler(engine)
        cancelled, claimed = race(partial(cancel, engine, job_id), one.claim_one)
        with session_scope(engine) as session:
            job = session.get(JobRow, job_id)
            assert job is not None
            if cancelled == S.JOB_STATE_CANCELLED:  # the cancel came first: the job never runs
                # (the scheduler found nothing, or found the job taken when it locked it: True,
                # look again, and then nothing)
                assert claimed is False or (claimed is True and one.claim_one() is False), claimed
                assert job.state == S.JOB_STATE_CANCELLED and job.attempt == 0
                outcomes["cancel first"] += 1
            else:  # the assignment came first: the cancel must reach the run
                assert cancelled == S.JOB_STATE_CANCELLING, cancelled
                assert isinstance(claimed, Claim) and claimed.job.id == job_id
                assert job.state == S.JOB_STATE_CANCELLING and job.attempt == 1 and job.cancel_requested
                outcomes["assignment first"] += 1
        with session_scope(engine, serialized=True) as session:  # the run ends; the node is free again
            job = jobs.get_job(session, name=f"jobs/{job_id}", for_update=True)
            if job.state == S.JOB_STATE_CANCELLING:
                lifecycle.transition(session, job=job, to=S.JOB_STATE_CANCELLED, reason="stopped")
    control_seqs_are_whole(engine)
    print(f"cancel vs assign: {dict(outcomes)}")


def test_two_schedulers_never_assign_a_job_twice_or_a_node_beyond_its_capacity(
        engine: sqlalchemy.engine.Engine) -> None:
    rounds, queued, capacity, node_count = 4, 12, 2, 3
    for r in range(rounds):
        add_nodes(engine, node_count, capacity=capacity) if r == 0 else None
        for i in range(queued):
            add_job(engine, f"j-{r}-{i}", state=S.JOB_STATE_QUEUED)

        def drain(one: Scheduler) -> list[str]:
            claims = []
            while (claimed := one.claim_one()) is not False:
                if isinstance(claimed, Claim):
                    claims.append(claimed.job.id)
            return claims
        first, second = race(lambda: drain(scheduler(engine)), lambda: drain(scheduler(engine)))
        assert isinstance(first, list) and isinstance(second, list), (first, second)
        assert not set(first) & set(second), "a job was claimed by both"
        assert len(first) + len(second) == node_count * capacity  # every free slot, and no more
        with session_scope(engine) as session:
            assigned = list(session.exec(select(JobRow).where(JobRow.state == S.JOB_STATE_ASSIGNED)))
            assert sorted(j.id for j in assigned) == sorted(first + second)
            assert all(j.attempt == 1 for j in assigned)
            load = Counter(j.trainer_node for j in assigned)
            assert max(load.values()) <= capacity, load
        with session_scope(engine) as session:  # this round's runs end: the nodes are free again
            for job in session.exec(select(JobRow).where(col(JobRow.state).in_(job_states.ACTIVE))):
                job.state, job.trainer_node = S.JOB_STATE_SUCCEEDED, ""
                session.add(job)
    control_seqs_are_whole(engine)


def test_a_relay_lease_has_one_holder_and_passes_on_only_when_it_lapses(engine: sqlalchemy.engine.Engine) -> None:
    add_nodes(engine, 1, capacity=4)
    add_job(engine, "j-1", state=S.JOB_STATE_QUEUED)
    a, b = scheduler(engine), scheduler(engine)
    a._lease = b._lease = timedelta(seconds=0.5)
    assert isinstance(a.claim_one(), Claim)  # the replica that assigns the job holds its lease
    assert a.renew_leases() == {"j-1"} and b.renew_leases() == set()
    time.sleep(0.7)  # a renews nothing (it died): its lease lapses
    assert b.renew_leases() == {"j-1"} and a.renew_leases() == set()
    for _ in range(4):  # replicas renewing at once after a lapse: exactly one holds the job
        time.sleep(0.6)
        first, second = race(a.renew_leases, b.renew_leases)
        assert sorted((first, second), key=len) == [set(), {"j-1"}], (first, second)  # type: ignore[arg-type]


class CountingMetrics:
    """A metrics service's AppendJobEvents that records every event it is sent (a slow one: each
    call takes a few ms, so two relays would overlap if nothing kept them apart)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def AppendJobEvents(self, request: object, timeout: float) -> None:  # the gRPC method's name
        time.sleep(0.005)
        with self._lock:
            self.sent.extend((request.job, event.source_seq) for event in request.events)  # type: ignore[attr-defined]


def test_two_replicas_outbox_relays_send_each_row_once_in_order(engine: sqlalchemy.engine.Engine) -> None:
    from types import SimpleNamespace

    from services.pipeline_svc.runtime.outbox_relay import BATCH, OutboxRelay

    jobs_rows = {f"jobs/j{j}": range(1, BATCH + 51) for j in range(3)}
    with session_scope(engine) as session:
        for job, seqs in jobs_rows.items():
            for seq in seqs:
                event = S.JobEvent(job=job, attempt=0, source_seq=seq)
                session.add(OutboxRow(job=job, payload=event.SerializeToString()))
    metrics = CountingMetrics()
    stopping = threading.Event()
    relays = [OutboxRelay(engine, SimpleNamespace(metrics=metrics), stopping=stopping) for _ in range(2)]  # type: ignore[arg-type]
    for relay in relays:
        relay.start()
        relay.wake()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            with session_scope(engine) as session:
                if not session.exec(select(OutboxRow)).first():
                    break
            time.sleep(0.05)
    finally:
        stopping.set()
        for relay in relays:
            relay.join(10)
    assert Counter(metrics.sent) == Counter((job, seq) for job, seqs in jobs_rows.items() for seq in seqs), \
        "every row sent exactly once"
    for job, seqs in jobs_rows.items():
        assert [seq for sent_job, seq in metrics.sent if sent_job == job] == list(seqs), f"{job} in order"
