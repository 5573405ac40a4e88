"""The event log of each job attempt this node runs, and the registry of those runs.

A run's events are kept in memory in source order (source_seq from 1) so any number of relays
can read them and resume after a disconnect; training itself never waits for a reader.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from segtrain.common.v1 import common_pb2

from services.common.errors import FailedPreconditionError, NotFoundError
from services.common.timeutil import utcnow

# Finished runs are kept this long for relays that reconnect late.
FINISHED_RETENTION_S = 3600.0


@dataclass
class JobRun:
    job: str
    attempt: int
    events: list[common_pb2.JobEvent] = field(default_factory=list)
    finished: bool = False
    finished_at: float = 0.0
    cancel_requested: bool = False
    stop_early: bool = False
    # How the model was initialised; recorded with the registered model.
    initialisation: str = "fresh"
    handing_back: bool = False
    # Called after each cancel or hand-back request: forwards it to the attempt's worker process.
    on_control: Callable[[], None] | None = None
    # Tiles per batch (all ranks together), and the training rate measured between the last two
    # progress events (0 until there are two), for /metrics.
    batch_size: int = 0
    images_per_second: float = 0.0
    _last_progress: tuple[int, float] = (0, 0.0)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, event: common_pb2.JobEvent) -> None:
        with self._cond:
            event.job = self.job
            event.attempt = self.attempt
            event.source_seq = len(self.events) + 1
            event.event_time.FromDatetime(utcnow())
            self.events.append(event)
            if event.HasField("finished"):
                self.finished, self.finished_at = True, time.monotonic()
            elif event.HasField("batch_progress"):
                self._measure(event.batch_progress)
            self._cond.notify_all()

    def _measure(self, progress: common_pb2.BatchProgress) -> None:
        """Images per second between this progress event and the one before (across an epoch's
        end too, validation included then)."""
        now = time.monotonic()
        done = (progress.epoch - 1) * progress.batches + progress.batch  # batches since the attempt began
        before, at = self._last_progress
        if before and done > before and now > at:
            self.images_per_second = (done - before) * self.batch_size / (now - at)
        self._last_progress = (done, now)

    def request_cancel(self, stop_early: bool) -> None:
        with self._cond:
            self.cancel_requested = True
            self.stop_early = self.stop_early or stop_early
        self._forward_control()

    def hand_back(self) -> None:
        """Stop at the next batch and return the job to the queue (the node is shutting down)."""
        with self._cond:
            self.cancel_requested = True
            self.handing_back = True
        self._forward_control()

    def _forward_control(self) -> None:
        if self.on_control is not None:
            self.on_control()

    def wait_finished(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def follow(self, after: int, heartbeat_s: float, is_active: Callable[[], bool]) -> Iterator[common_pb2.JobEvent]:
        """Events after `after`, then new ones as they come, until the run's final event."""
        while is_active():
            with self._cond:
                if len(self.events) <= after and not self.finished:
                    self._cond.wait(heartbeat_s)
                pending = self.events[after:]
            yield from pending
            after += len(pending)
            if self.finished and after >= len(self.events):
                return


class RunRegistry:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._runs: dict[str, JobRun] = {}
        self._lock = threading.Lock()

    def add(self, job: str, attempt: int) -> JobRun | None:
        """A new run, or None if this attempt is already here. Refuses when the node is full."""
        with self._lock:
            self._expire()
            current = self._runs.get(job)
            if current is not None and current.attempt == attempt:
                return None
            if current is not None and not current.finished:
                current.request_cancel(False)  # superseded by a newer attempt
            # A superseded attempt of the same job stops within a batch; it does not hold a slot.
            if len([r for r in self.active() if r.job != job]) >= self.capacity:
                raise FailedPreconditionError(f"this node already runs {self.capacity} job(s)")
            run = JobRun(job=job, attempt=attempt)
            self._runs[job] = run
            return run

    def get(self, job: str, attempt: int) -> JobRun:
        with self._lock:
            run = self._runs.get(job)
        if run is None or (attempt and run.attempt != attempt):
            raise NotFoundError(f"{job} attempt {attempt} on this node")
        return run

    def find(self, job: str) -> JobRun | None:
        with self._lock:
            return self._runs.get(job)

    def active(self) -> list[JobRun]:
        return [r for r in list(self._runs.values()) if not r.finished]

    def _expire(self) -> None:
        now = time.monotonic()
        for job, run in list(self._runs.items()):
            if run.finished and now - run.finished_at > FINISHED_RETENTION_S:
                del self._runs[job]
