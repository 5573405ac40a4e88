"""Moving events: trainer node -> metrics service, and the outbox -> metrics service.

`JobRelay` follows one active job: it reads the trainer node's event stream (resuming after the
last relayed source_seq), appends each event to the metrics service (persisted before anyone sees
it), then updates the job's progress and state here. The node's final event finalises the job:
the model is registered and the job marked SUCCEEDED in one transaction.

`OutboxRelay` forwards the pipeline service's own events (state changes) from the outbox table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.common import names
from services.common.database import session_scope
from services.common.errors import FailedPreconditionError
from services.pipeline_svc import jobs, models
from services.pipeline_svc.remote import Remotes
from services.pipeline_svc.tables import JobRow, OutboxRow, TrainerNodeRow

log = logging.getLogger(__name__)
S = common_pb2
RETRY_S = 0.5
# Answers that retrying the same rows can never change: the rows are at fault, not the service.
REFUSED_FOR_GOOD = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}


class JobRelay(threading.Thread):
    def __init__(self, engine: Engine, remotes: Remotes, outbox: jobs.Outbox, job_id: str,
                 on_exit: Callable[[str], None], stopping: threading.Event, max_attempts: int) -> None:
        super().__init__(name=f"relay-{job_id}", daemon=True)
        self._max_attempts = max_attempts
        self._engine, self._remotes, self._outbox = engine, remotes, outbox
        self.job_id = job_id
        self._on_exit = on_exit
        self._stopping = stopping
        self._call: grpc.Future | None = None

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                target = self._locate()
                if target is None:
                    return
                address, attempt, after = target
                try:
                    self._follow(address, attempt, after)
                except grpc.RpcError as exc:
                    if not self._handle_stream_error(exc, attempt):
                        return
                    self._stopping.wait(RETRY_S)
        except Exception:
            log.exception("relay of jobs/%s failed", self.job_id)
        finally:
            self._on_exit(self.job_id)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def _locate(self) -> tuple[str, int, int] | None:
        """(node address, attempt, last relayed source_seq) while the job is active, else None."""
        with session_scope(self._engine) as session:
            job = session.get(JobRow, self.job_id)
            if job is None or job.state not in jobs.ACTIVE:
                return None
            node = session.get(TrainerNodeRow, job.trainer_node)
            if node is None:
                return None
            return node.address, job.attempt, job.relayed_source_seq

    def _follow(self, address: str, attempt: int, after: int) -> None:
        request = trainer_pb2.WatchJobRunRequest(job=names.job(self.job_id), attempt=attempt, after_source_seq=after)
        call = self._remotes.trainer(address).WatchJobRun(request)
        self._call = call  # type: ignore[assignment]
        for response in call:
            self._append(response.event)
            if self._apply(response.event):
                return

    def _append(self, event: common_pb2.JobEvent) -> None:
        """Appends to the metrics service, retrying while it is unavailable (idempotent)."""
        request = metrics_pb2.AppendJobEventsRequest(job=event.job, events=[event])
        while True:
            try:
                self._remotes.metrics.AppendJobEvents(request, timeout=10)
                return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if self._stopping.wait(RETRY_S):
                    raise
                log.warning("metrics service unavailable; retrying append for jobs/%s", self.job_id)

    def _apply(self, event: common_pb2.JobEvent) -> bool:
        """Updates the job from one relayed event; True once the job is final here."""
        with session_scope(self._engine) as session:
            job = session.get(JobRow, self.job_id, with_for_update=True)
            if job is None or job.attempt != event.attempt or job.state not in jobs.ACTIVE:
                return True
            job.relayed_source_seq = event.source_seq
            if event.HasField("progress"):
                job.progress = event.progress.SerializeToString()
            if event.HasField("epoch_metrics"):
                job.latest_metrics = event.epoch_metrics.SerializeToString()
            if event.HasField("checkpoint_saved") and event.checkpoint_saved.kind == "state":
                job.checkpoint_uri = event.checkpoint_saved.uri
            if job.state == S.JOB_STATE_ASSIGNED:
                jobs.transition(session, job, S.JOB_STATE_RUNNING)
            done = event.HasField("finished")
            if done:
                _finalise(session, job, event.finished, self._max_attempts)
            session.add(job)
        self._outbox.wake.set()
        return done

    def _handle_stream_error(self, exc: grpc.RpcError, attempt: int) -> bool:
        """Whether to reconnect. A node that no longer knows the job hands it back to the queue."""
        if exc.code() == grpc.StatusCode.CANCELLED and self._stopping.is_set():
            return False
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            with session_scope(self._engine) as session:
                job = session.get(JobRow, self.job_id, with_for_update=True)
                if job is not None and job.attempt == attempt and job.state in jobs.ACTIVE:
                    jobs.requeue(session, job, "the trainer node lost the job (restarted?)", self._max_attempts)
            self._outbox.wake.set()
            return False
        log.info("stream of jobs/%s interrupted (%s); reconnecting", self.job_id, exc.code())
        return True


def _finalise(session: Session, job: JobRow, finished: common_pb2.JobFinished, max_attempts: int) -> None:
    if finished.state == S.JOB_STATE_QUEUED:  # the node shut down gracefully and handed the job back
        jobs.requeue(session, job, finished.reason or "handed back by its trainer node", max_attempts)
    elif finished.state == S.JOB_STATE_SUCCEEDED:
        try:
            models.register(session, job, finished)
        except FailedPreconditionError as exc:
            jobs.transition(session, job, S.JOB_STATE_FAILED, reason=f"model not registered: {exc.message}")
            return
        job.quality_warnings = [{"code": w.code, "class_name": w.class_name, "message": w.message}
                                for w in finished.quality_warnings]
        caveat = "; ".join(f"{w.code} ({w.class_name})" for w in finished.quality_warnings)
        jobs.transition(session, job, S.JOB_STATE_SUCCEEDED,
                        reason=f"the model has quality warnings: {caveat}" if caveat else "")
    elif finished.state == S.JOB_STATE_CANCELLED:
        jobs.transition(session, job, S.JOB_STATE_CANCELLED, reason=finished.reason or "cancelled")
    else:
        jobs.transition(session, job, S.JOB_STATE_FAILED, reason=finished.reason or "failed")


class OutboxRelay(threading.Thread):
    """Forwards outbox rows to the metrics service in order, deleting each once it is stored."""

    def __init__(self, engine: Engine, remotes: Remotes, outbox: jobs.Outbox, stopping: threading.Event) -> None:
        super().__init__(name="outbox-relay", daemon=True)
        self._engine, self._remotes, self._outbox, self._stopping = engine, remotes, outbox, stopping

    def run(self) -> None:
        while not self._stopping.is_set():
            self._outbox.wake.wait(2.0)
            self._outbox.wake.clear()
            try:
                while self._drain_once():
                    pass
            except grpc.RpcError as exc:
                log.warning("outbox relay: metrics service answered %s; retrying", exc.code())
                time.sleep(RETRY_S)
            except Exception:
                log.exception("outbox relay failed; retrying")
                time.sleep(RETRY_S)

    def _drain_once(self) -> bool:
        with session_scope(self._engine) as session:
            rows = list(session.exec(select(OutboxRow).where(col(OutboxRow.parked).is_(False))
                                     .order_by(col(OutboxRow.id)).limit(200)))
        if not rows:
            return False
        by_job: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_job.setdefault(row.job, []).append(row)
        for job, job_rows in by_job.items():
            try:
                self._append(job, job_rows)
            except grpc.RpcError as exc:
                if exc.code() not in REFUSED_FOR_GOOD:
                    raise  # transient (the metrics service is down, overloaded, slow): retried as a whole
                for row in job_rows:  # find the rows refused for good; the others go through
                    self._append_or_park(job, row)
        return True

    def _append(self, job: str, rows: list[OutboxRow]) -> None:
        events = [common_pb2.JobEvent.FromString(r.payload) for r in rows]
        self._remotes.metrics.AppendJobEvents(metrics_pb2.AppendJobEventsRequest(job=job, events=events), timeout=10)
        with session_scope(self._engine) as session:
            for r in rows:
                stored = session.get(OutboxRow, r.id)
                if stored is not None:
                    session.delete(stored)

    def _append_or_park(self, job: str, row: OutboxRow) -> None:
        try:
            self._append(job, [row])
        except grpc.RpcError as exc:
            if exc.code() not in REFUSED_FOR_GOOD:
                raise
            reason = f"{exc.code().name}: {exc.details()}"[:500]
            log.error("outbox relay: the metrics service refused event row %s of %s for good (%s); parked",
                      row.id, job, reason)
            with session_scope(self._engine) as session:
                stored = session.get(OutboxRow, row.id)
                if stored is not None:
                    stored.parked, stored.park_reason = True, reason
                    session.add(stored)
