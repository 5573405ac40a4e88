"""Jobs: creation with validated hyperparameters, the persisted state machine, and the control
events (attempt 0) each state change puts in the outbox in the same transaction."""

from __future__ import annotations

import threading

from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from segcore import intensity
from services.common import hyperparameters as wire
from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.pagination import page
from services.common.timeutil import utcnow
from services.pipeline_svc import catalog, hyperparameters, training_sets
from services.pipeline_svc.tables import JobRow, ModelRow, OutboxRow, TrainingSetRow

S = common_pb2
TERMINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}
ACTIVE = {S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING}

# Every legal transition; anything else is FAILED_PRECONDITION.
TRANSITIONS: dict[int, set[int]] = {
    S.JOB_STATE_PENDING: {S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED},
    S.JOB_STATE_QUEUED: {S.JOB_STATE_ASSIGNED, S.JOB_STATE_CANCELLED},
    S.JOB_STATE_ASSIGNED: {S.JOB_STATE_RUNNING, S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLING,
                           S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED},
    S.JOB_STATE_RUNNING: {S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLING, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED},
    S.JOB_STATE_CANCELLING: {S.JOB_STATE_CANCELLED, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED},
}


def state_name(state: int) -> str:
    return S.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


class Outbox:
    """Wakes the relay that forwards outbox rows to the metrics service."""

    def __init__(self) -> None:
        self.wake = threading.Event()


def transition(session: Session, job: JobRow, to: int, *, reason: str = "") -> None:
    """Moves `job` to state `to` and queues the state-change event; the caller commits."""
    if to not in TRANSITIONS.get(job.state, set()):
        raise FailedPreconditionError(
            f"{names.job(job.id)} is {state_name(job.state)}; it cannot become {state_name(to)}"
        )
    now = utcnow()
    job.state = to
    job.update_time = now
    if to in TERMINAL:
        job.end_time = now
        job.trainer_node = ""
    if to == S.JOB_STATE_FAILED or to == S.JOB_STATE_CANCELLED:
        job.failure_reason = reason
    emit(session, job, common_pb2.JobEvent(state_change=common_pb2.StateChange(state=to, reason=reason)))  # type: ignore[arg-type]
    session.add(job)


def emit(session: Session, job: JobRow, event: common_pb2.JobEvent) -> None:
    """Queues a control event of the pipeline service (attempt 0) in the outbox."""
    job.control_seq += 1
    event.job = names.format_name(names.JOBS, job.id)
    event.attempt = 0
    event.source_seq = job.control_seq
    event.event_time.FromDatetime(utcnow())
    session.add(OutboxRow(job=event.job, payload=event.SerializeToString()))


def get_row(session: Session, name: str, *, field: str = "name", for_update: bool = False) -> JobRow:
    job_id = names.parse_name(name, names.JOBS, field=field)
    row = session.get(JobRow, job_id, with_for_update=for_update)
    if row is None:
        raise NotFoundError(names.format_name(names.JOBS, job_id))
    return row


def list_rows(session: Session, pipeline: str, page_size: int, page_token: str) -> tuple[list[JobRow], str]:
    query = select(JobRow).order_by(col(JobRow.create_time).desc(), col(JobRow.id))
    if pipeline:
        query = query.where(JobRow.pipeline == names.parse_name(pipeline, names.PIPELINES, field="pipeline"))
    return page(session, query, page_size, page_token)


def create(engine: Engine, request: pb.CreateJobRequest, architectures: catalog.Architectures,
           outbox: Outbox) -> JobRow:
    hyperparameters.validate(request.hyperparameters, architectures.names(), prefix="hyperparameters")
    _check_pretrained(request)
    with session_scope(engine) as session:
        if request.request_id:
            previous = session.exec(select(JobRow).where(JobRow.request_id == request.request_id)).first()
            if previous is not None:
                return previous
        pipeline = catalog.get_row(session, request.pipeline, field="pipeline")
        if pipeline.type != pb.Pipeline.TYPE_TRAINING:
            raise FailedPreconditionError(f"{names.pipeline(pipeline.id)} is not a TRAINING pipeline")
        training_set = training_sets.get_row(session, request.training_set, field="training_set")
        overrides = request.hyperparameters
        parent = None
        if request.from_model:
            parent = _parent(session, request.from_model, overrides)
            if not overrides.HasField("architecture"):
                overrides = wire.merged(overrides, common_pb2.Hyperparameters(architecture=parent.architecture))
        effective = hyperparameters.effective(catalog.stored_hyperparameters(pipeline), overrides)
        effective.normalization, reason = _normalization(session, effective.normalization, training_set, parent,
                                                         pretrained=bool(request.pretrained_weights))
        job = JobRow(
            id=names.new_id("j"), display_name=request.display_name, pipeline=pipeline.id,
            training_set=training_set.id, from_model=parent.id if parent else "",
            pretrained_weights=request.pretrained_weights,
            hyperparameters=effective.SerializeToString(), state=S.JOB_STATE_PENDING,
            request_id=request.request_id or None, normalization_reason=reason,
        )
        emit(session, job, common_pb2.JobEvent(state_change=common_pb2.StateChange(state=S.JOB_STATE_PENDING)))
        emit(session, job, common_pb2.JobEvent(warning=common_pb2.Warning(code="NORMALIZATION", message=reason)))
        session.add(job)
    outbox.wake.set()
    return job


def _normalization(session: Session, requested: str, training_set: TrainingSetRow, parent: ModelRow | None, *,
                   pretrained: bool) -> tuple[str, str]:
    """The concrete normalization a job uses and why: "auto" resolved from the set's image
    profile, the parent model's normalization, and whether a pretrained backbone is loaded."""
    parent_mode = None
    if parent is not None:
        parent_job = session.get(JobRow, parent.job)
        parent_params = common_pb2.Hyperparameters.FromString(parent_job.hyperparameters) if parent_job else None
        # Models from before normalization modes used what is now called "dataset".
        parent_mode = parent_params.normalization if parent_params and parent_params.normalization else "dataset"
    profile = training_sets.image_profile(training_set)
    return intensity.choose_normalization(requested, profile, pretrained=pretrained, parent_mode=parent_mode)


def _check_pretrained(request: pb.CreateJobRequest) -> None:
    source = request.pretrained_weights
    if not source:
        return
    if request.from_model:
        raise InvalidArgumentError.of("pretrained_weights", "a job starts from from_model or from pretrained weights, "
                                                            "not both")
    if source.startswith(("file:/", "hf:")) and len(source.split(":", 1)[1]) > 1:
        return
    object_keys.check_upload_key(source, field="pretrained_weights")


def _parent(session: Session, name: str, overrides: common_pb2.Hyperparameters) -> ModelRow:
    model_id = names.parse_name(name, names.MODELS, field="from_model")
    parent = session.get(ModelRow, model_id)
    if parent is None:
        raise NotFoundError(names.format_name(names.MODELS, model_id))
    if overrides.HasField("architecture") and overrides.architecture != parent.architecture:
        raise FailedPreconditionError(
            f"from_model {names.model(model_id)} is a {parent.architecture!r} model; it cannot initialise "
            f"architecture {overrides.architecture!r}"
        )
    return parent


def start(engine: Engine, name: str, outbox: Outbox, scheduler_wake: threading.Event) -> JobRow:
    with session_scope(engine) as session:
        job = get_row(session, name, for_update=True)
        transition(session, job, S.JOB_STATE_QUEUED)
        job.start_time = utcnow()
        job.progress = common_pb2.Progress(phase=S.PHASE_QUEUED).SerializeToString()
    outbox.wake.set()
    scheduler_wake.set()
    return job


def request_cancel(engine: Engine, name: str, stop_early: bool, outbox: Outbox) -> tuple[JobRow, str]:
    """Cancels a pending/queued job at once; marks an active one CANCELLING and returns the node
    address that must be told (empty when nothing runs)."""
    with session_scope(engine) as session:
        job = get_row(session, name, for_update=True)
        if job.state in (S.JOB_STATE_PENDING, S.JOB_STATE_QUEUED):
            transition(session, job, S.JOB_STATE_CANCELLED, reason="cancelled before it ran")
            node = ""
        elif job.state == S.JOB_STATE_CANCELLING:
            node = job.trainer_node
        else:
            transition(session, job, S.JOB_STATE_CANCELLING,
                       reason="stop early requested" if stop_early else "cancel requested")
            job.cancel_requested, job.stop_early, node = True, stop_early, job.trainer_node
    outbox.wake.set()
    return job, node


def requeue(session: Session, job: JobRow, reason: str, max_attempts: int) -> None:
    """Hands an active job back to the queue, or cancels it if a cancel was pending, or fails it
    once it has used up its attempts (a job that keeps losing its node needs a person)."""
    if job.state == S.JOB_STATE_CANCELLING:
        transition(session, job, S.JOB_STATE_CANCELLED, reason=reason)
        return
    if job.attempt >= max_attempts:
        transition(session, job, S.JOB_STATE_FAILED, reason=(
            f"{reason}; gave up after {job.attempt} attempts (SEGTRAIN_PIPELINE_MAX_ATTEMPTS); the last "
            "full-state checkpoint is kept, so starting a new job from scratch is not needed to debug it"))
        return
    transition(session, job, S.JOB_STATE_QUEUED, reason=reason)
    job.trainer_node = ""
    job.progress = common_pb2.Progress(phase=S.PHASE_QUEUED).SerializeToString()
