"""A job's persisted life: moving it through the state machine (services.common.job_states) and
the control events (attempt 0) each move puts in the outbox in the same transaction, so a crash
or a metrics outage never loses one."""

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


def transition(session: Session, *, job: JobRow, to: int, reason: str = "") -> None:
    """Moves `job` to state `to` and queues the state-change event; the caller commits."""
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
