"""Following one active job: `JobRelay` reads the trainer node's event stream (resuming after the
last relayed source_seq), appends the events to the metrics service (persisted before anyone
sees them), then updates the job's progress and state here. Events that arrive while one batch
is being relayed go together in the next: one AppendJobEvents and one transaction however fast
the node sends. The node's final event finalises the job: the model is registered (its weights
must lie under the attempt's keys and match the sha256 the node reported, read back from
storage) and the job marked SUCCEEDED in one transaction."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine
from sqlmodel import Session

from services.common import job_states, logs, names, object_keys
from services.common.database import session_scope
from services.common.errors import FailedPreconditionError, NotFoundError, UnavailableError
from services.common.storage import ObjectStore
from services.pipeline_svc.resources import analyses, jobs, lifecycle, models
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.tables import JobRow, ModelRow, TrainerNodeRow

log = logging.getLogger(__name__)
S = common_pb2
RETRY_S = 0.5
MAX_BATCH = 500  # events relayed in one append (the metrics service takes up to 1000)


class JobRelay(threading.Thread):
    def __init__(self, engine: Engine, peers: PeerStubs, store: ObjectStore, *, job_id: str, max_attempts: int,
                 stopping: threading.Event, wake_outbox: Callable[[], None], on_exit: Callable[[str], None],
                 starting: Callable[[str], bool] = lambda job_id: False, owner: str = "") -> None:
        super().__init__(name=f"relay-{job_id}", daemon=True)
        self._engine, self._peers, self._store = engine, peers, store
        self.job_id = job_id
        # The replica this relay runs on: it changes the job only while that replica holds the
        # job's relay lease (runtime/scheduler.py; "" for a relay outside a scheduler).
        self._owner = owner
        self._max_attempts = max_attempts
        self._stopping = stopping
        self._wake_outbox = wake_outbox
        self._on_exit = on_exit
        self._starting = starting  # whether the scheduler is still handing the job's attempt to its nodes
        self._call: grpc.Future | None = None
        self._name = names.job(job_id)  # an analysis job's name instead: set by _locate
        self._interrupted = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                target = self._locate()
                if target is None:
                    return
                node, attempt, after = target
                with logs.about_job(self._name, attempt):
                    try:
                        self._follow(node, attempt, after)
                    except _AppendRefused as refused:
                        self._requeue(attempt, f"the attempt's events were refused ({refused})")
                        return
                    except grpc.RpcError as exc:
                        if not self._handle_stream_error(exc, attempt):
                            return
                        self._stopping.wait(RETRY_S)
        except Exception:
            log.exception("relay of %s failed", self._name)
        finally:
            self._on_exit(self.job_id)

    def stop(self) -> None:
        """Ends the current stream; the relay then stops, or follows the job wherever it now runs.
        A stream being opened right now is ended as soon as it is (see _follow)."""
        self._interrupted.set()
        if self._call is not None:
            self._call.cancel()

    def _locate(self) -> tuple[tuple[str, str], int, int] | None:
        """((node id, address), attempt, last relayed source_seq) while the job is active, else None."""
        self._interrupted.clear()  # what follows reads the job as it is now
        with session_scope(self._engine) as session:
            job = session.get(JobRow, self.job_id)
            if job is None or job.state not in job_states.ACTIVE or not self._holds(job):
                return None
            self._name = lifecycle.log_name(job)
            node = session.get(TrainerNodeRow, job.trainer_node)
            if node is None:
                return None
            return (node.id, node.address), job.attempt, job.relayed_source_seq

    def _follow(self, node: tuple[str, str], attempt: int, after: int) -> None:
        request = trainer_pb2.WatchJobRunRequest(job=self._name, attempt=attempt, after_source_seq=after)
        log.info("following %s attempt %d on trainer node %s after source_seq %d", self._name, attempt, node[0], after)
        call = self._peers.trainer(*node).WatchJobRun(request)
        self._call = call  # type: ignore[assignment]
        if self._interrupted.is_set():  # stop() came between _locate and this call
            call.cancel()
        for events in _batches(call, MAX_BATCH):
            self._check_from_node(events, attempt)
            self._append(events)
            if self._apply(events):
                log.info("%s attempt %d has ended; its log is relayed", self._name, attempt)
                self._keep_only_the_model()
                return  # the job is final here (closing the batches ends the stream)

    def _check_from_node(self, events: list[common_pb2.JobEvent], attempt: int) -> None:
        """A node speaks for the attempt it was given only: an event naming another job or attempt,
        or changing the job's state (the pipeline's alone to record), gives the attempt up."""
        for event in events:
            if event.job != self._name or event.attempt != attempt:
                raise _AppendRefused(f"the trainer node sent an event of {event.job} attempt {event.attempt} "
                                     f"on the stream of {self._name} attempt {attempt}")
            if event.HasField("state_change"):
                raise _AppendRefused("the trainer node sent a state change, which only the pipeline records")

    def _append(self, events: list[common_pb2.JobEvent]) -> None:
        """Appends to the metrics service, retrying while it is unavailable (idempotent)."""
        request = metrics_pb2.AppendJobEventsRequest(job=self._name, events=events)
        while True:
            try:
                self._peers.metrics.AppendJobEvents(request, timeout=10)
                return
            except grpc.RpcError as exc:
                if exc.code() in _REFUSALS:
                    # Retrying the same events would be refused forever and stall the job.
                    raise _AppendRefused(f"the metrics service answered {exc.code().name}: {exc.details()}") from None
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if self._stopping.wait(RETRY_S):
                    raise
                log.warning("metrics service unavailable; retrying append for %s", self._name)

    def _holds(self, job: JobRow) -> bool:
        """Whether this relay's replica holds the job's relay lease."""
        return not self._owner or job.relay_owner == self._owner

    def _weights_problem(self, events: list[common_pb2.JobEvent]) -> str | None:
        """Why the weights a successful final event reports cannot be registered (None: they can,
        or there is no such event): each must be in storage with the sha256 the node reported.
        Read before the transaction opens (it may take seconds for large weights)."""
        final = next((e for e in events if e.HasField("finished")), None)
        if final is None or final.finished.state != S.JOB_STATE_SUCCEEDED or not final.finished.HasField("best_model"):
            return None
        prefix = object_keys.attempt_prefix(self.job_id, final.attempt)
        for artifact, key in ((final.finished.best_model, object_keys.model_weights(prefix, "best")),
                              (final.finished.final_model, object_keys.model_weights(prefix, "final"))):
            if artifact.uri != key:
                return None  # not this attempt's: register_model refuses it, naming the key it expected
            while True:
                try:
                    actual = self._store.sha256(artifact.uri)
                    break
                except NotFoundError:
                    return f"the weights {artifact.uri!r} the trainer node reported are not in storage"
                except UnavailableError:
                    if self._stopping.wait(RETRY_S):
                        raise
            if actual != artifact.sha256.lower():
                return (f"the weights {artifact.uri!r} do not match the sha256 the trainer node reported "
                        f"({artifact.sha256[:12]}…; stored {actual[:12]}…)")
        return None

    def _apply(self, events: list[common_pb2.JobEvent]) -> bool:
        """Updates the job from relayed events, in one transaction; True once the job is final here."""
        done = False
        weights_problem = self._weights_problem(events)
        with session_scope(self._engine, serialized=True) as session:
            job = lifecycle.locked(session, self.job_id)
            for event in events:
                if (job is None or job.attempt != event.attempt or job.state not in job_states.ACTIVE
                        or not self._holds(job)):
                    done = True  # (another replica follows the job now: it applies these events)
                    break
                job.relayed_source_seq = event.source_seq
                if event.HasField("progress"):
                    job.progress = event.progress.SerializeToString()
                if event.HasField("epoch_metrics"):
                    job.latest_metrics = event.epoch_metrics.SerializeToString()
                if event.HasField("checkpoint_saved") and event.checkpoint_saved.kind == "state":
                    job.checkpoint_uri = event.checkpoint_saved.uri
                    job.checkpoint_epoch = event.checkpoint_saved.epoch
                if job.state == S.JOB_STATE_ASSIGNED:
                    lifecycle.transition(session, job=job, to=S.JOB_STATE_RUNNING)
                if event.HasField("finished"):
                    _finalise(session, job, event.finished, self._max_attempts, weights_problem)
                    done = True
                    break
            if job is not None:
                session.add(job)
        self._wake_outbox()
        return done

    def _keep_only_the_model(self) -> None:
        """After a training job's success only its model's weights are kept: the rolling
        checkpoints, tile manifests and other attempts' files are deleted (a failed or cancelled
        job keeps its last checkpoint, to resume or debug from)."""
        with session_scope(self._engine) as session:
            job = session.get(JobRow, self.job_id)
            model = session.get(ModelRow, job.model) if job is not None and job.model else None
        if job is None or job.state != S.JOB_STATE_SUCCEEDED or job.kind != jobs.TRAINING or model is None:
            return
        keep = set(models.weights_keys(model))
        exports = object_keys.model_exports_prefix(self.job_id)  # an export may already have been asked for
        try:
            self._store.delete_many([k for k in self._store.list_keys(object_keys.job_prefix(self.job_id))
                                     if k not in keep and not k.startswith(exports)])
        except UnavailableError:
            log.warning("%s succeeded, but its checkpoints could not be deleted: the object store is unavailable",
                        self._name)

    def _requeue(self, attempt: int, reason: str) -> None:
        """Gives the attempt up: the job goes back to the queue (or FAILED after its last attempt)."""
        log.warning("%s attempt %d: %s", self._name, attempt, reason)
        with session_scope(self._engine, serialized=True) as session:
            job = lifecycle.locked(session, self.job_id)
            if job is not None and job.attempt == attempt and job.state in job_states.ACTIVE and self._holds(job):
                lifecycle.requeue(session, job=job, reason=reason, max_attempts=self._max_attempts)
        self._wake_outbox()

    def _handle_stream_error(self, exc: grpc.RpcError, attempt: int) -> bool:
        """Whether to reconnect. A node that no longer knows the job hands it back to the queue."""
        if exc.code() == grpc.StatusCode.CANCELLED and self._stopping.is_set():
            return False
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            if self._starting(self.job_id):
                return True  # the attempt is recorded but its RunJob is still on its way: not lost
            self._requeue(attempt, "the trainer node lost the job (restarted?)")
            return False
        if exc.code() in _REFUSALS:
            self._requeue(attempt, f"the trainer node refused to stream the attempt ({exc.code().name}: "
                                   f"{exc.details()})")
            return False
        log.info("stream of %s interrupted (%s); reconnecting", self._name, exc.code())
        return True


class _AppendRefused(Exception):
    """A batch of the attempt's events is refused for good: by the metrics service, or here for
    not being the attempt's own."""


# Answers that the same call would get again: the attempt is given up (re-queued, counting attempts).
_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                       grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                       grpc.StatusCode.UNIMPLEMENTED})


def _batches(call: Iterator[trainer_pb2.WatchJobRunResponse], most: int) -> Iterator[list[common_pb2.JobEvent]]:
    """The stream's events in batches: each holds what arrived while the previous one was handled
    (at least one event, at most `most`). A reader thread drains the stream into a bounded queue
    (a full queue holds the node back through gRPC flow control); the stream's error, or its end,
    comes after the events before it."""
    arrived: queue.Queue[Any] = queue.Queue(maxsize=4 * most)
    closed = threading.Event()

    def put(item: object) -> None:
        while not closed.is_set():  # a relay that stopped reading must not strand this thread
            try:
                arrived.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            for response in call:
                put(response.event)
            put(None)
        except BaseException as exc:  # handed to the relay, which decides
            put(exc)

    threading.Thread(target=read, name="relay-reader", daemon=True).start()
    try:
        while True:
            item = arrived.get()
            batch: list[common_pb2.JobEvent] = []
            while isinstance(item, common_pb2.JobEvent):
                batch.append(item)
                if len(batch) == most:
                    item = _MORE
                    break
                try:
                    item = arrived.get_nowait()
                except queue.Empty:
                    item = _MORE
            if batch:
                yield batch
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
    finally:
        closed.set()
        call.cancel()  # type: ignore[attr-defined]


_MORE = object()  # the queue is empty for now, or the batch is full: wait for the next


def _finalise(session: Session, job: JobRow, finished: common_pb2.JobFinished, max_attempts: int,
              weights_problem: str | None) -> None:
    """Ends the attempt as its node reported; the job is RUNNING or CANCELLING here."""
    if finished.state == S.JOB_STATE_QUEUED:  # the node shut down gracefully and handed the job back
        lifecycle.requeue(session, job=job, reason=finished.reason or "handed back by its trainer node",
                          max_attempts=max_attempts)
    elif finished.state == S.JOB_STATE_SUCCEEDED:
        _succeed(session, job, finished, weights_problem)
    elif finished.state == S.JOB_STATE_CANCELLED:
        lifecycle.transition(session, job=job, to=S.JOB_STATE_CANCELLED, reason=finished.reason or "cancelled")
    else:
        lifecycle.transition(session, job=job, to=S.JOB_STATE_FAILED, reason=finished.reason or "failed")


def _succeed(session: Session, job: JobRow, finished: common_pb2.JobFinished, weights_problem: str | None) -> None:
    if job.kind == jobs.ANALYSIS:
        try:
            analyses.record_output(session, job=job, output=finished.analysis)
        except FailedPreconditionError as exc:
            lifecycle.transition(session, job=job, to=S.JOB_STATE_FAILED, reason=f"results not kept: {exc.message}")
            return
        lifecycle.transition(session, job=job, to=S.JOB_STATE_SUCCEEDED)
        return
    try:
        if weights_problem is not None:
            raise FailedPreconditionError(weights_problem)
        models.register_model(session, job=job, finished=finished)
    except FailedPreconditionError as exc:
        lifecycle.transition(session, job=job, to=S.JOB_STATE_FAILED, reason=f"model not registered: {exc.message}")
        return
    job.quality_warnings = [{"code": w.code, "class_name": w.class_name, "message": w.message}
                            for w in finished.quality_warnings]
    caveat = "; ".join(f"{w.code} ({w.class_name})" for w in finished.quality_warnings)
    lifecycle.transition(session, job=job, to=S.JOB_STATE_SUCCEEDED,
                         reason=f"the model has quality warnings: {caveat}" if caveat else "")
