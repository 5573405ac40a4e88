"""Event-log retention: every SEGTRAIN_METRICS_RETENTION_INTERVAL_S the metrics service lets go of
the logs whose newest event is older than SEGTRAIN_METRICS_RETENTION_DAYS (jobs that ended long
ago, whole), and keeps at most SEGTRAIN_METRICS_MAX_EVENTS_PER_JOB events of any log (its oldest
go, so what is held stays one run of seqs). Reading or watching from before what is held answers
OUT_OF_RANGE naming the first seq still held (with a google.rpc.ErrorInfo carrying it)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.engine import Engine

from services.common.database import session_scope
from services.common.locks import exclusive
from services.common.timeutil import utcnow
from services.metrics_svc import repository

log = logging.getLogger(__name__)
_JOBS_PER_TRANSACTION = 100  # each pass deletes in short transactions


@dataclass(frozen=True)
class Retention:
    days: float = 90.0  # 0: logs are kept however old
    max_events_per_job: int = 100_000  # 0: no cap
    interval_s: float = 600.0


class RetentionThread(threading.Thread):
    def __init__(self, engine: Engine, retention: Retention, stopping: threading.Event) -> None:
        super().__init__(name="event-retention", daemon=True)
        self._engine, self._retention, self._stopping = engine, retention, stopping

    def run(self) -> None:
        while not self._stopping.wait(self._retention.interval_s):
            try:
                with exclusive(self._engine, "event-log retention") as mine:  # one replica's pass at a time
                    expired, cut = apply(self._engine, self._retention) if mine else (0, 0)
                if expired or cut:
                    log.info("event-log retention: %d logs expired, %d cut to their newest %d events", expired, cut,
                             self._retention.max_events_per_job)
            except Exception:
                log.exception("event-log retention pass failed; retried at the next")


def apply(engine: Engine, retention: Retention) -> tuple[int, int]:
    """One pass: (logs expired whole, logs cut to their newest events)."""
    expired = cut = 0
    if retention.days > 0:
        written_before = utcnow() - timedelta(days=retention.days)
        while True:
            with session_scope(engine) as session:
                done = repository.expire_logs(session, written_before=written_before, limit=_JOBS_PER_TRANSACTION)
            expired += done
            if done < _JOBS_PER_TRANSACTION:
                break
    if retention.max_events_per_job > 0:
        while True:
            with session_scope(engine) as session:
                done = repository.truncate_logs(session, keep=retention.max_events_per_job,
                                                limit=_JOBS_PER_TRANSACTION)
            cut += done
            if done < _JOBS_PER_TRANSACTION:
                break
    return expired, cut
