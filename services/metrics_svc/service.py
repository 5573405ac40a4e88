"""The metrics service's logic: appending events (persist, then publish), history, replay-then-
live watching, and charts.

Its methods are coroutines of the server's event loop; SQL and chart rendering run in the
server's bounded executors (services.common.gate), appends in the reserved pool, so no number of
watchers or readers can delay the events that move jobs along.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from segtrain.common.v1 import common_pb2
from sqlalchemy.engine import Engine

from services.common import job_states, names
from services.common.database import lock_name, session_scope
from services.common.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnavailableError,
    check,
)
from services.common.gate import Executors
from services.metrics_svc import charts, observed, repository
from services.metrics_svc.hub import EventHub, Published

log = logging.getLogger(__name__)

REPLAY_PAGE = 500
MAX_APPEND = 1000


def is_terminal(event: common_pb2.JobEvent) -> bool:
    """The pipeline service's final state change ends a job's log."""
    return event.HasField("state_change") and event.state_change.state in job_states.TERMINAL


@dataclass(frozen=True)
class Heartbeat:
    last_seq: int


class MetricsService:
    def __init__(self, engine: Engine, executors: Executors, *, heartbeat_interval_s: float, watcher_buffer: int,
                 unknown_job_grace_s: float = 2.0, poll_interval_s: float = 0.0) -> None:
        self._engine = engine
        # Replicas: events another replica appended reach this one's watchers through one poller
        # per watched job, reading the database every poll_interval_s (0: one replica, no poll).
        self._poll_s = poll_interval_s
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._executors = executors
        self._heartbeat_s = heartbeat_interval_s
        self._unknown_job_grace_s = unknown_job_grace_s
        self.hub = EventHub(watcher_buffer)
        self._closing = False
        # Appends to one job are serialised so seq numbers stay gap-free and publish order = seq order;
        # a fixed set of striped locks keeps memory bounded however many jobs there are.
        self._job_locks = [threading.Lock() for _ in range(64)]

    async def append(self, job: str, events: Sequence[common_pb2.JobEvent]) -> tuple[int, int]:
        job = names.canonical_run(job, field="job")
        _validate_events(events)
        return await self._executors.run(self._append, job, events, asyncio.get_running_loop(), reserved=True)

    def _append(self, job: str, events: Sequence[common_pb2.JobEvent], loop: asyncio.AbstractEventLoop
                ) -> tuple[int, int]:
        with self._job_locks[zlib.crc32(job.encode()) % len(self._job_locks)]:
            # The lock above orders this replica's appends; the database's orders every
            # replica's (a per-job advisory lock on PostgreSQL, the write lock on SQLite).
            with session_scope(self._engine, serialized=True) as session:
                lock_name(session, f"job-events:{job}")
                stored = repository.append(session, job=job, events=events)
                last = repository.last_seq(session, job=job)
                last_source = (
                    repository.last_source_seq(session, job=job, attempt=events[-1].attempt) if events else 0
                )
            # Published only after the commit (an event is persisted before anyone sees it), and
            # queued to the loop under the job's lock: publish order is seq order.
            loop.call_soon_threadsafe(self.hub.publish, job, stored)
            observed.stored(stored)
        return last, last_source

    async def delete_log(self, job: str) -> int:
        job = names.canonical_run(job, field="job")
        return await self._executors.run(self._delete_log, job, reserved=True)

    def _delete_log(self, job: str) -> int:
        with session_scope(self._engine, serialized=True) as session:
            lock_name(session, f"job-events:{job}")  # after any append in progress
            return repository.delete_log(session, job=job)

    async def list_events(self, job: str, after_seq: int, page_size: int) -> tuple[list[common_pb2.JobEvent], int]:
        job = names.canonical_run(job, field="job")
        check(_range_violations(after_seq, page_size, MAX_APPEND * 5))
        return await self._executors.run(self._list_events, job, after_seq, page_size or REPLAY_PAGE)

    def _list_events(self, job: str, after_seq: int, limit: int) -> tuple[list[common_pb2.JobEvent], int]:
        with session_scope(self._engine) as session:
            events = repository.read(session, job=job, after_seq=after_seq, limit=limit)
            if events and events[0].seq > after_seq + 1:
                raise _expired(job, events[0].seq)
            return events, repository.last_seq(session, job=job)

    async def history(self, job: str) -> tuple[list[common_pb2.EpochMetrics], int]:
        """Each epoch once: a later attempt's epoch supersedes the earlier attempt's."""
        job = names.canonical_run(job, field="job")
        return await self._executors.run(self._history, job)

    def _history(self, job: str) -> tuple[list[common_pb2.EpochMetrics], int]:
        with session_scope(self._engine) as session:
            epoch_events = repository.read_kind(session, jobs=[job], kind="epoch_metrics")
            finals = repository.read_kind(session, jobs=[job], kind="state_change")
        final_state = next((e.state_change.state for e in reversed(finals) if is_terminal(e)), 0)
        return effective_epochs(epoch_events), final_state

    async def watch(self, job: str, after_seq: int, *, include_batch_progress: bool
                    ) -> AsyncIterator[common_pb2.JobEvent | Published | Heartbeat]:
        """Replays the log after `after_seq` (events read from the store), then streams live events
        (as published, serialized once for every watcher); ends after the final event.
        A job with no events is NOT_FOUND, once its first event had a moment to arrive (a job just
        created has its first event on the way from the pipeline's outbox)."""
        job = names.canonical_run(job, field="job")
        if after_seq < 0:
            raise InvalidArgumentError.of("after_seq", "must be >= 0")
        if self._closing:
            raise UnavailableError("the metrics service is stopping; reconnect")
        sub = self.hub.subscribe(job)  # before the replay, so nothing falls between the two
        try:
            last = after_seq
            held, tail = await self._executors.run(self._log_end, job)
            if not held:
                await sub.take(self._unknown_job_grace_s)
                held, tail = await self._executors.run(self._log_end, job)
                if not held:
                    raise NotFoundError(job)  # no events: no such job
            if self._poll_s:  # other replicas' events after what this watch replays from the store
                self.hub.published.setdefault(job, held)
                if job not in self._pollers:
                    self._pollers[job] = asyncio.get_running_loop().create_task(self._poll(job))
            if tail and is_terminal(tail[0]) and after_seq >= held:
                return  # the client has seen the whole, finished log
            if after_seq > held:
                raise OutOfRangeError(
                    f"after_seq {after_seq} is beyond this job's log (last seq {held}); "
                    "re-read the history with ListJobEvents and watch from its last seq"
                )
            replaying = True
            while True:  # a client that leaves cancels this coroutine at its next await
                batch: Sequence[common_pb2.JobEvent | Published]
                if replaying:
                    stored = await self._executors.run(self._replay, job, last)
                    replaying = len(stored) == REPLAY_PAGE  # caught up once a page comes back short
                    if not stored:
                        continue
                    if stored[0].seq > last + 1:  # what comes next was let go (retention)
                        raise _expired(job, stored[0].seq)
                    batch = stored
                else:
                    batch = await sub.take(self._heartbeat_s)
                if sub.closed:
                    raise UnavailableError(f"the metrics service is stopping; reconnect with after_seq={last}")
                if sub.overflowed:
                    raise ResourceExhaustedError(
                        f"watcher fell too far behind; reconnect with after_seq={last} to resume"
                    )
                if not batch:
                    yield Heartbeat(last)
                    continue
                for item in batch:
                    event = item.event if isinstance(item, Published) else item
                    if event.seq <= last:
                        continue  # seen in the replay already
                    if event.seq > last + 1:
                        replaying = True  # a gap: read the missing events from the store
                        break
                    last = event.seq
                    if include_batch_progress or not event.HasField("batch_progress"):
                        yield item
                    if is_terminal(event):
                        return
        finally:
            self.hub.unsubscribe(sub)

    async def _poll(self, job: str) -> None:
        """Publishes what other replicas appended to `job`, while anyone here watches it."""
        try:
            while self.hub.watched(job) and not self._closing:
                await asyncio.sleep(self._poll_s)
                events = await self._executors.run(self._replay, job, self.hub.published.get(job, 0))
                if events and self.hub.watched(job):
                    self.hub.publish(job, events)
        except Exception:
            log.exception("polling %s for other replicas' events failed; its watchers resume from the store", job)
        finally:
            self._pollers.pop(job, None)

    def close_watches(self) -> None:
        """Ends every open watch with UNAVAILABLE (clients resume from their last seq elsewhere),
        so a stopping service does not hold its watchers until the grace period ends. Call it
        on the server's loop."""
        self._closing = True
        self.hub.close_all()

    def _log_end(self, job: str) -> tuple[int, list[common_pb2.JobEvent]]:
        """The job's last seq and its last event (none when it has no events)."""
        with session_scope(self._engine) as session:
            held = repository.last_seq(session, job=job)
            return held, repository.read(session, job=job, after_seq=held - 1, limit=1) if held else []

    def _replay(self, job: str, after_seq: int) -> list[common_pb2.JobEvent]:
        with session_scope(self._engine) as session:
            return repository.read(session, job=job, after_seq=after_seq, limit=REPLAY_PAGE)

    async def render_charts(self, jobs: Sequence[str], width: int, height: int) -> tuple[bytes, bytes]:
        return await self._executors.run(self._render_charts, jobs, width, height)

    def _render_charts(self, jobs: Sequence[str], width: int, height: int) -> tuple[bytes, bytes]:
        if not jobs:
            raise InvalidArgumentError.of("jobs", "name at least one job")
        job_names = [names.canonical(j, names.JOBS, field="jobs") for j in jobs]
        width, height = width or 800, height or 480
        check([v for v in [
            FieldViolation("width", "must be 200..4000") if not 200 <= width <= 4000 else None,
            FieldViolation("height", "must be 150..4000") if not 150 <= height <= 4000 else None,
        ] if v])
        with session_scope(self._engine) as session:
            epoch_events = repository.read_kind(session, jobs=job_names, kind="epoch_metrics")
        series = {
            names.parse_name(name, names.JOBS): [
                charts.EpochPoint(m.epoch, m.train_loss, m.val_loss, m.train_iou, m.val_iou)
                for m in effective_epochs([e for e in epoch_events if e.job == name])
            ]
            for name in job_names
        }
        return (charts.render_loss_chart(series, width=width, height=height),
                charts.render_iou_chart(series, width=width, height=height))


def _expired(job: str, first_held: int) -> OutOfRangeError:
    return OutOfRangeError(f"events up to seq {first_held - 1} of {job} are no longer held (event-log retention); "
                           f"the first seq still held is {first_held}: read or watch from after_seq={first_held - 1}",
                           first_held=first_held)


def effective_epochs(events: Sequence[common_pb2.JobEvent]) -> list[common_pb2.EpochMetrics]:
    """Epoch metrics in seq order, where an attempt's first epoch drops that epoch and all later
    ones of earlier attempts (they were trained again after a resume)."""
    epochs: dict[int, common_pb2.EpochMetrics] = {}
    attempt = None
    for event in events:
        metrics = event.epoch_metrics
        if event.attempt != attempt:
            attempt = event.attempt
            epochs = {e: m for e, m in epochs.items() if e < metrics.epoch}
        epochs[metrics.epoch] = metrics
    return [epochs[e] for e in sorted(epochs)]


def _range_violations(after_seq: int, page_size: int, max_page: int) -> list[FieldViolation]:
    violations = []
    if after_seq < 0:
        violations.append(FieldViolation("after_seq", "must be >= 0"))
    if not 0 <= page_size <= max_page:
        violations.append(FieldViolation("page_size", f"must be 0..{max_page}"))
    return violations


def _validate_events(events: Sequence[common_pb2.JobEvent]) -> None:
    if len(events) > MAX_APPEND:
        raise InvalidArgumentError.of("events", f"at most {MAX_APPEND} events per call")
    violations = []
    for i, event in enumerate(events):
        if event.attempt < 0:
            violations.append(FieldViolation(f"events[{i}].attempt", "must be >= 0"))
        if event.source_seq < 1:
            violations.append(FieldViolation(f"events[{i}].source_seq", "must be >= 1"))
        if event.WhichOneof("payload") is None:
            violations.append(FieldViolation(f"events[{i}]", "has no payload"))
    check(violations)
