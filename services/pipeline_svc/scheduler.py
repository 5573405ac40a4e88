"""The scheduler: assigns queued jobs to trainer nodes with free capacity, keeps one relay per
active job, and hands back the jobs of nodes that stopped heartbeating."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common import names, object_keys
from services.common.database import session_scope
from services.pipeline_svc import jobs, models, nodes, training_sets
from services.pipeline_svc.relay import JobRelay
from services.pipeline_svc.remote import Remotes
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TrainerNodeRow

log = logging.getLogger(__name__)
S = common_pb2


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, remotes: Remotes, outbox: jobs.Outbox, *,
                 interval_s: float, heartbeat_interval_s: float, max_attempts: int) -> None:
        super().__init__(name="scheduler", daemon=True)
        self._engine, self._remotes, self._outbox = engine, remotes, outbox
        self._interval_s = interval_s
        self._max_attempts = max_attempts
        self._lost_after = timedelta(seconds=3 * heartbeat_interval_s)
        # Nodes could not heartbeat while this service was down: judge them only after a full
        # lease period of this process's life.
        self._judge_nodes_after = time.monotonic() + self._lost_after.total_seconds()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._relays: dict[str, JobRelay] = {}
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler pass failed")
            self.wake.wait(self._interval_s)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        with self._lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.stop()

    def tick(self) -> None:
        """One pass: hand back work of lost nodes, assign queued jobs, (re)start relays."""
        if time.monotonic() >= self._judge_nodes_after:
            for node_id in nodes.mark_lost(self._engine, self._lost_after):
                self._hand_back(node_id)
        while self._assign_one():
            pass
        with session_scope(self._engine) as session:
            active = list(session.exec(select(JobRow.id).where(col(JobRow.state).in_(jobs.ACTIVE))))
        for job_id in active:
            self._ensure_relay(job_id)

    def _hand_back(self, node_id: str) -> None:
        with session_scope(self._engine) as session:
            for job in nodes.jobs_on(session, node_id):
                log.warning("trainer node %s lost; re-queueing jobs/%s", node_id, job.id)
                jobs.requeue(session, job, f"trainer node {node_id} stopped responding", self._max_attempts)
        self._outbox.wake.set()

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
            jobs.transition(session, job, S.JOB_STATE_ASSIGNED)
            request = self._run_request(session, job)
            address = node.address
        self._outbox.wake.set()
        try:
            self._remotes.trainer(address).RunJob(request, timeout=30)
        except grpc.RpcError as exc:
            log.warning("trainer node %s refused jobs/%s: %s", node.id, job.id, exc.code())
            with session_scope(self._engine) as session:
                fresh = session.get(JobRow, job.id, with_for_update=True)
                if fresh is not None and fresh.state == S.JOB_STATE_ASSIGNED and fresh.attempt == job.attempt:
                    fresh.attempt -= 1  # the attempt never started: it does not count
                    jobs.requeue(session, fresh, f"trainer node {node.id} could not take the job", self._max_attempts)
                stale = session.get(TrainerNodeRow, node.id)
                if stale is not None and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    stale.state = nodes.LOST
                    session.add(stale)
            return False  # try again on the next pass, not in a tight loop
        self._ensure_relay(job.id)
        return True

    def _run_request(self, session: Session, job: JobRow) -> trainer_pb2.RunJobRequest:
        # Jobs reference rows that are never deleted; the foreign keys were checked at creation.
        training_set = training_sets.get_row(session, job.training_set)
        pipeline = session.get(PipelineRow, job.pipeline)
        assert pipeline is not None
        request = trainer_pb2.RunJobRequest(
            job=names.job(job.id), attempt=job.attempt,
            hyperparameters=common_pb2.Hyperparameters.FromString(job.hyperparameters),
            class_names=training_set.class_names, tile_size=pipeline.tile_size,
            training_set=names.training_set(training_set.id), training_set_snapshot=training_set.snapshot,
            output_prefix=object_keys.attempt_prefix(job.id, job.attempt), resume_checkpoint_uri=job.checkpoint_uri,
            pretrained_weights=job.pretrained_weights,
            tiles=[trainer_pb2.TrainingTile(name=t.name, image_uri=t.image_uri, mask_uri=t.mask_uri,
                                            validation=t.validation)
                   for t in training_sets.tiles_of(session, training_set.id)],
        )
        if job.from_model:
            request.from_model.CopyFrom(model_ref(models.get_row(session, job.from_model)))
        return request

    def _ensure_relay(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._relays or self.stopping.is_set():
                return
            relay = JobRelay(self._engine, self._remotes, self._outbox, job_id, self._relay_exited, self.stopping,
                             self._max_attempts)
            self._relays[job_id] = relay
        relay.start()

    def _relay_exited(self, job_id: str) -> None:
        with self._lock:
            self._relays.pop(job_id, None)
        self.wake.set()  # a node may have freed up


def model_ref(model: ModelRow) -> trainer_pb2.ModelRef:
    finished = common_pb2.JobFinished.FromString(model.finished)
    return trainer_pb2.ModelRef(name=names.model(model.id), weights_uri=finished.best_model.uri,
                                weights_sha256=model.weights_sha256 or finished.best_model.sha256,
                                architecture=model.architecture, class_names=model.class_names)
