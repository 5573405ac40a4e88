"""The scheduler: assigns queued jobs to trainer nodes with free capacity, keeps one relay per
active job, and hands back the jobs of nodes that stopped heartbeating."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common import job_states, names
from services.common.database import session_scope
from services.pipeline_svc import converters
from services.pipeline_svc.resources import lifecycle, models, training_sets
from services.pipeline_svc.runtime import nodes
from services.pipeline_svc.runtime.job_relay import JobRelay
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.tables import JobRow, PipelineRow, TrainerNodeRow

log = logging.getLogger(__name__)
S = common_pb2


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, peers: PeerStubs, *, interval_s: float, heartbeat_interval_s: float,
                 max_attempts: int, stopping: threading.Event, wake_outbox: Callable[[], None]) -> None:
        super().__init__(name="scheduler", daemon=True)
        self._engine, self._peers = engine, peers
        self._interval_s = interval_s
        self._max_attempts = max_attempts
        self._stopping = stopping
        self._wake_outbox = wake_outbox
        self._lost_after = timedelta(seconds=3 * heartbeat_interval_s)
        # Nodes could not heartbeat while this service was down: judge them only after a full
        # lease period of this process's life.
        self._judge_nodes_after = time.monotonic() + self._lost_after.total_seconds()
        self._pending = threading.Event()
        self._relays: dict[str, JobRelay] = {}
        self._lock = threading.Lock()

    def wake(self) -> None:
        """Something changed (a job queued, a node registered or freed): run a pass now."""
        self._pending.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._pending.clear()  # before the pass: a wake during it runs another at once
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed")
            self._pending.wait(self._interval_s)

    def stop_relays(self) -> None:
        """Ends every relay's stream (call after setting `stopping`)."""
        self._pending.set()
        with self._lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.stop()

    def tick(self) -> None:
        """One pass: hand back work of lost nodes, assign queued jobs, (re)start relays."""
        if time.monotonic() >= self._judge_nodes_after:
            with session_scope(self._engine) as session:
                lost = nodes.mark_lost_nodes(session, timeout=self._lost_after)
            for node_id in lost:
                self._hand_back(node_id)
        while self._assign_one():
            pass
        with session_scope(self._engine) as session:
            active = list(session.exec(select(JobRow.id).where(col(JobRow.state).in_(job_states.ACTIVE))))
        for job_id in active:
            self._ensure_relay(job_id)

    def _hand_back(self, node_id: str) -> None:
        with session_scope(self._engine) as session:
            handed_back = nodes.jobs_on_node(session, node_id=node_id)
            for job in handed_back:
                log.warning("trainer node %s lost; re-queueing %s", node_id, names.job(job.id))
                lifecycle.requeue(session, job=job, reason=f"trainer node {node_id} stopped responding",
                                  max_attempts=self._max_attempts)
        self._wake_outbox()
        for job in handed_back:
            # Its relay may be waiting on the lost node's stream (a frozen process answers nothing
            # until keepalive gives up): end that stream so the next attempt is followed at once.
            self._interrupt_relay(job.id)

    def _assign_one(self) -> bool:
        with session_scope(self._engine) as session:
            free = nodes.free_nodes(session)
            job = session.exec(select(JobRow).where(JobRow.state == S.JOB_STATE_QUEUED)
                               .order_by(col(JobRow.start_time))).first()
            if not free or job is None:
                return False
            node = free[0][0]
            job.attempt += 1
            job.trainer_node = node.id
            job.relayed_source_seq = 0
            lifecycle.transition(session, job=job, to=S.JOB_STATE_ASSIGNED)
            request = _run_request(session, job)
            address = node.address
        self._wake_outbox()
        try:
            self._peers.trainer(address).RunJob(request, timeout=30)
        except grpc.RpcError as exc:
            log.warning("trainer node %s refused %s: %s", node.id, names.job(job.id), exc.code())
            self._undo_assignment(job, node.id, exc.code())
            return False  # try again on the next pass, not in a tight loop
        self._ensure_relay(job.id)
        return True

    def _undo_assignment(self, job: JobRow, node_id: str, code: grpc.StatusCode) -> None:
        with session_scope(self._engine) as session:
            fresh = session.get(JobRow, job.id, with_for_update=True)
            if fresh is not None and fresh.state == S.JOB_STATE_ASSIGNED and fresh.attempt == job.attempt:
                fresh.attempt -= 1  # the attempt never started: it does not count
                lifecycle.requeue(session, job=fresh, reason=f"trainer node {node_id} could not take the job",
                                  max_attempts=self._max_attempts)
            stale = session.get(TrainerNodeRow, node_id)
            if stale is not None and code == grpc.StatusCode.UNAVAILABLE:
                stale.state = nodes.LOST
                session.add(stale)

    def _ensure_relay(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._relays or self._stopping.is_set():
                return
            relay = JobRelay(self._engine, self._peers, job_id=job_id, max_attempts=self._max_attempts,
                             stopping=self._stopping, wake_outbox=self._wake_outbox, on_exit=self._relay_exited)
            self._relays[job_id] = relay
        relay.start()

    def _interrupt_relay(self, job_id: str) -> None:
        with self._lock:
            relay = self._relays.get(job_id)
        if relay is not None:
            relay.stop()

    def _relay_exited(self, job_id: str) -> None:
        with self._lock:
            self._relays.pop(job_id, None)
        self.wake()  # a node may have freed up


def _run_request(session: Session, job: JobRow) -> trainer_pb2.RunJobRequest:
    # Jobs reference rows that are never deleted; the foreign keys were checked at creation.
    training_set = training_sets.get_training_set(session, name=job.training_set)
    pipeline = session.get(PipelineRow, job.pipeline)
    assert pipeline is not None
    parent = models.get_model(session, name=job.from_model) if job.from_model else None
    return converters.run_job_request(job, training_set=training_set, tile_size=pipeline.tile_size,
                                      tiles=training_sets.tiles_of(session, set_id=training_set.id), parent=parent)
