"""Forwarding the pipeline service's own events (state changes, attempt 0) from the outbox table
to the metrics service, in order, deleting each row once it is stored; and, for a deleted job or
analysis, the request to delete its event log (a `forget_log` row, its last).

Only transient errors are retried. A row the metrics service refuses for good is parked with its
reason (kept for a person, logged) and no longer blocks the rows behind it.

With several replicas, one drains the outbox at a time (services/common/locks.py; the others skip
and look again shortly), so each row normally goes out once. Should two ever send one row (a
holder that died after the append, before the delete), the metrics service skips what it already
stored ((attempt, source_seq) per job)."""

from __future__ import annotations

import logging
import threading

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from services.common.database import session_scope
from services.common.locks import exclusive
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.tables import OutboxRow

log = logging.getLogger(__name__)
RETRY_S = 0.5
BATCH = 200
OUTBOX_LOCK = "outbox relay"
BUSY_RETRY_S = 0.25
# Answers that retrying the same rows can never change: the rows are at fault, not the service.
REFUSED_FOR_GOOD = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}


class OutboxRelay(threading.Thread):
    def __init__(self, engine: Engine, peers: PeerStubs, *, stopping: threading.Event) -> None:
        super().__init__(name="outbox-relay", daemon=True)
        self._engine, self._peers, self._stopping = engine, peers, stopping
        self._pending = threading.Event()

    def wake(self) -> None:
        """New rows were committed: forward them now rather than at the next poll."""
        self._pending.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._pending.wait(2.0)
            self._pending.clear()
            try:
                while self._drain_once():
                    pass
            except grpc.RpcError as exc:
                log.warning("outbox relay: metrics service answered %s; retrying", exc.code())
                self._stopping.wait(RETRY_S)
            except Exception:
                log.exception("outbox relay failed; retrying")
                self._stopping.wait(RETRY_S)

    def _drain_once(self) -> bool:
        """Forwards one batch; False when the outbox is empty or another replica is draining it."""
        with exclusive(self._engine, OUTBOX_LOCK) as held:
            if not held:
                self._stopping.wait(BUSY_RETRY_S)  # it may finish before it sees this replica's rows
                self._pending.set()
                return False
            return self._drain_batch()

    def _drain_batch(self) -> bool:
        with session_scope(self._engine) as session:
            rows = list(session.exec(select(OutboxRow).where(col(OutboxRow.parked).is_(False))
                                     .order_by(col(OutboxRow.id)).limit(BATCH)))
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
        """Sends the job's rows in order: its events, then (a deleted job's last row) the request
        to delete its log."""
        events = [common_pb2.JobEvent.FromString(r.payload) for r in rows if not r.forget_log]
        if events:
            self._peers.metrics.AppendJobEvents(metrics_pb2.AppendJobEventsRequest(job=job, events=events),
                                                timeout=10)
        if any(r.forget_log for r in rows):
            self._peers.metrics.DeleteJobEvents(metrics_pb2.DeleteJobEventsRequest(job=job), timeout=30)
        with session_scope(self._engine) as session:  # (rows a deleted job took along are gone already)
            session.execute(delete(OutboxRow).where(col(OutboxRow.id).in_([r.id for r in rows])))

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
