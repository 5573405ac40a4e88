"""A job's persisted life: moving it through the state machine (services.common.job_states) and
the control events (attempt 0) each move puts in the outbox in the same transaction, so a crash
or a metrics outage never loses one.

Every change starts from the job read with `locked` in a serialized session (services.common.
database): no two writers ever change one job from the same reading, so no state change is lost
and no two take the same `control_seq`. `transition` and `emit_control_event` refuse a job that
was not read so (or created in this transaction: `created`)."""

from __future__ import annotations

from segtrain.common.v1 import common_pb2
from sqlmodel import Session

from services.common import job_states, names
from services.common.errors import FailedPreconditionError
from services.common.timeutil import utcnow
from services.pipeline_svc.tables import JobRow, OutboxRow

S = common_pb2


def log_name(job: JobRow) -> str:
    """The job's resource name, which also names its event log: a training job's, or an
    analysis job's (names.analysis)."""
    return names.analysis(job.id) if job.kind == "analysis" else names.job(job.id)


def locked(session: Session, job_id: str) -> JobRow | None:
    """The job, read afresh for a change: no other writer can change it until this transaction
    ends (its row is locked on PostgreSQL; the serialized session holds SQLite's write lock)."""
    if not session.info.get("serialized"):
        raise RuntimeError("jobs change in serialized sessions only: session_scope(engine, serialized=True)")
    job = session.get(JobRow, job_id, with_for_update=True, populate_existing=True)
    if job is not None:
        session.info.setdefault(_LOCKED, set()).add(job.id)
    return job


def created(session: Session, job: JobRow) -> None:
    """Marks a job this transaction inserts as its own to change."""
    session.info.setdefault(_LOCKED, set()).add(job.id)


def _check_locked(session: Session, job: JobRow) -> None:
    if job.id not in session.info.get(_LOCKED, ()):
        raise RuntimeError(f"{job.id} was not read with lifecycle.locked in this transaction: a change to it "
                           "could overwrite another writer's")


_LOCKED = "locked_jobs"


def transition(session: Session, *, job: JobRow, to: int, reason: str = "") -> None:
    """Moves `job` to state `to` and queues the state-change event; the caller commits."""
    _check_locked(session, job)
    if not job_states.can_move(job.state, to):
        raise FailedPreconditionError(
            f"{log_name(job)} is {job_states.state_name(job.state)}; it cannot become {job_states.state_name(to)}"
        )
    now = utcnow()
    job.state = to
    job.update_time = now
    if to in job_states.TERMINAL:
        job.end_time = now
        job.trainer_node = ""
    if to == S.JOB_STATE_FAILED or to == S.JOB_STATE_CANCELLED:
        job.failure_reason = reason
    emit_control_event(session, job=job, event=S.JobEvent(state_change=S.StateChange(state=to, reason=reason)))  # type: ignore[arg-type]
    session.add(job)


def emit_control_event(session: Session, *, job: JobRow, event: common_pb2.JobEvent) -> None:
    """Queues a control event of the pipeline service (attempt 0) in the outbox."""
    _check_locked(session, job)
    job.control_seq += 1
    event.job = log_name(job)
    event.attempt = 0
    event.source_seq = job.control_seq
    event.event_time.FromDatetime(utcnow())
    session.add(OutboxRow(job=event.job, payload=event.SerializeToString()))


def requeue(session: Session, *, job: JobRow, reason: str, max_attempts: int) -> None:
    """Hands an active job back to the queue, or cancels it if a cancel was pending, or fails it
    once it has used up its attempts (a job that keeps losing its node needs a person)."""
    if job.state == S.JOB_STATE_CANCELLING:
        transition(session, job=job, to=S.JOB_STATE_CANCELLED, reason=reason)
        return
    if job.attempt >= max_attempts:
        transition(session, job=job, to=S.JOB_STATE_FAILED, reason=(
            f"{reason}; gave up after {job.attempt} attempts (SEGTRAIN_PIPELINE_MAX_ATTEMPTS); the last "
            "full-state checkpoint is kept, so starting a new job from scratch is not needed to debug it"))
        return
    transition(session, job=job, to=S.JOB_STATE_QUEUED, reason=reason)
    job.trainer_node, job.gang_nodes = "", []
    job.progress = S.Progress(phase=S.PHASE_QUEUED).SerializeToString()
