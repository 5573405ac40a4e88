"""Jobs: creation with validated, frozen hyperparameters, lookups, start and cancel. The state
machine and its outbox events are lifecycle.py's."""

from __future__ import annotations

from collections.abc import Collection

from segtrain.common.v1 import common_pb2
from sqlmodel import Session, col, select

from segcore import admission, intensity
from services.common import names, object_keys
from services.common.errors import FailedPreconditionError, FieldViolation, InvalidArgumentError, NotFoundError, check
from services.common.timeutil import utcnow
from services.common.tokens import Principal
from services.pipeline_svc.domain import JobSpec
from services.pipeline_svc.resources import (
    hyperparameters,
    lifecycle,
    lookup,
    models,
    ownership,
    pipelines,
    training_sets,
)
from services.pipeline_svc.tables import JobRow, ModelRow, TrainerNodeRow, TrainingSetRow

S = common_pb2
# segtrain.common.v1.Parallelism's bounds.
MAX_PROCESSES, MAX_NODES = 64, 16


TRAINING, ANALYSIS = "training", "analysis"  # JobRow.kind


def get_job(session: Session, *, name: str, field: str = "name", for_update: bool = False,
            kind: str = TRAINING) -> JobRow:
    """The job of that kind (an analysis job is not a training job's resource, nor the reverse)."""
    collection = names.ANALYSES if kind == ANALYSIS else names.JOBS
    if for_update:  # read to be changed: locked until the transaction ends (lifecycle.locked)
        job_id = names.parse_name(name, collection, field=field)
        locked = lifecycle.locked(session, job_id)
        if locked is None:
            raise NotFoundError(names.format_name(collection, job_id))
        job = locked
    else:
        job = lookup.get_by_name(session, table=JobRow, collection=collection, name=name, field=field)
    if job.kind != kind:
        raise NotFoundError(names.format_name(collection, job.id))
    return job


def list_jobs(session: Session, *, pipeline: str, page_size: int, page_token: str, owner: str = "",
              kind: str = TRAINING) -> tuple[list[JobRow], str]:
    return lookup.list_page(session, table=JobRow, pipeline=pipeline, page_size=page_size, page_token=page_token,
                            where=col(JobRow.kind) == kind, owner=owner)


def create_job(session: Session, *, spec: JobSpec, architectures: Collection[str]) -> JobRow:
    """A PENDING job whose effective hyperparameters are frozen now: the request's over the
    pipeline's over the contract's, with "auto" normalization resolved from the set's images."""
    hyperparameters.validate(spec.hyperparameters, architectures=architectures, prefix="hyperparameters")
    _check_pretrained(spec)
    previous = lookup.by_request_id(session, table=JobRow, request_id=spec.request_id)
    if previous is not None:
        return repeated_job(previous, spec)
    pipeline = pipelines.get_pipeline(session, name=spec.pipeline, field="pipeline")
    if pipeline.type != pipelines.TRAINING:
        raise FailedPreconditionError(f"{names.pipeline(pipeline.id)} is not a TRAINING pipeline")
    # Locked, like the parent model: neither can be deleted before this job is recorded.
    training_set = training_sets.ready_training_set(session, name=spec.training_set, field="training_set",
                                                    for_update=True)
    overrides = dict(spec.hyperparameters)
    parent = None
    if spec.from_model:
        parent = _parent(session, spec.from_model, overrides)
        overrides.setdefault("architecture", parent.architecture)
    effective = hyperparameters.effective(pipelines.stored_hyperparameters(pipeline), overrides)
    effective["normalization"], reason = _normalization(
        session, str(effective["normalization"]), training_set, parent, pretrained=bool(spec.pretrained_weights))
    processes, nodes = spec.processes or 1, spec.nodes or 1
    _check_parallelism(processes, nodes, int(effective["batch_size"]), training_set)  # type: ignore[call-overload]
    job = JobRow(
        id=names.new_id("j"), display_name=spec.display_name, pipeline=pipeline.id,
        training_set=training_set.id, from_model=parent.id if parent else "",
        pretrained_weights=spec.pretrained_weights, hyperparameters=hyperparameters.serialized(effective),
        state=S.JOB_STATE_PENDING, request_id=spec.request_id or None, normalization_reason=reason,
        processes=processes, nodes=nodes, owner=spec.owner,
    )
    check_fits(session, job_shape(job, tile_size=pipeline.tile_size))
    lifecycle.created(session, job)
    for event in (S.JobEvent(state_change=S.StateChange(state=S.JOB_STATE_PENDING)),
                  S.JobEvent(warning=S.Warning(code="NORMALIZATION", message=reason))):
        lifecycle.emit_control_event(session, job=job, event=event)
    session.add(job)
    return job


def _check_parallelism(processes: int, nodes: int, batch_size: int, training_set: TrainingSetRow) -> None:
    v = []
    if not 1 <= processes <= MAX_PROCESSES:
        v.append(FieldViolation("parallelism.processes", f"must be 1..{MAX_PROCESSES} (0 means 1)"))
    if not 1 <= nodes <= MAX_NODES:
        v.append(FieldViolation("parallelism.nodes", f"must be 1..{MAX_NODES} (0 means 1)"))
    check(v)
    world = processes * nodes
    if world > batch_size:
        v.append(FieldViolation("parallelism.processes", f"{world} processes cannot share a batch of {batch_size} "
                                "tiles: every process needs at least one (raise hyperparameters.batch_size)"))
    elif world > training_set.train_tile_count:
        v.append(FieldViolation("parallelism.processes", f"{world} processes cannot share the "
                                f"{training_set.train_tile_count} training tiles of the set"))
    check(v)


def job_shape(job: JobRow, *, tile_size: int) -> admission.JobShape:
    """What decides the job's memory (segcore.admission)."""
    values = hyperparameters.deserialized(job.hyperparameters)
    crop = values.get("crop_size")
    return admission.JobShape(str(values["architecture"]), int(values["batch_size"]),  # type: ignore[call-overload]
                              int(crop) if crop else None, tile_size, job.processes, job.nodes)  # type: ignore[call-overload]


def check_fits(session: Session, shape: admission.JobShape) -> None:
    """Admission: refuses, naming what to change, a job that no registered trainer node (lost ones
    included: they may come back) could hold. Nodes that have not said what they offer are not
    judged; nothing beyond ABSOLUTE_LIMIT_BYTES is accepted."""
    known = [n for n in session.exec(select(TrainerNodeRow)) if n.job_memory_bytes > 0]
    able = [n for n in known if n.max_processes >= shape.processes]
    if known and not able:
        raise InvalidArgumentError.of("parallelism.processes", f"no trainer node starts more than "
                                      f"{max(n.max_processes for n in known)} processes for one job")
    offers: list[tuple[int | None, str]] = [(n.job_memory_bytes, n.device) for n in able] or [(None, "cpu")]
    refusals = [shape.refusal(memory, device) for memory, device in offers]
    if None in refusals:
        return
    largest = max(range(len(offers)), key=lambda i: offers[i][0] or 0)  # name what to change for it
    field, reason = refusals[largest]  # type: ignore[misc]
    raise InvalidArgumentError.of(f"hyperparameters.{field}", reason)


def _normalization(session: Session, requested: str, training_set: TrainingSetRow, parent: ModelRow | None, *,
                   pretrained: bool) -> tuple[str, str]:
    """The concrete normalization a job uses and why: "auto" resolved from the set's image
    profile, the parent model's normalization, and whether a pretrained backbone is loaded."""
    parent_mode = None
    if parent is not None:
        parent_job = session.get(JobRow, parent.job)
        parent_params = hyperparameters.deserialized(parent_job.hyperparameters) if parent_job else {}
        # Models from before normalization modes used what is now called "dataset".
        parent_mode = str(parent_params.get("normalization") or "dataset")
    profile = training_sets.image_profile(training_set)
    return intensity.choose_normalization(requested, profile, pretrained=pretrained, parent_mode=parent_mode)


def repeated_job(job: JobRow, spec: JobSpec) -> JobRow:
    """The job an earlier request with the same request_id created, if this request asks for the
    same job; INVALID_ARGUMENT naming request_id (and what differs) otherwise."""
    differ = _differences(job, spec)
    if differ:
        raise InvalidArgumentError.of("request_id", f"already used for {names.job(job.id)}, created with other "
                                                    f"parameters ({', '.join(differ)}); use a new request_id")
    return job


def _differences(job: JobRow, spec: JobSpec) -> list[str]:
    """The fields of `spec` that ask for something else than what `job` recorded: every parameter
    the request names must match (hyperparameters it leaves unset may have any value)."""
    def same_id(name: str, recorded: str, collection: str) -> bool:
        return (name.removeprefix(f"{collection}/") if name else "") == recorded

    differ = [field for field, same in (
        ("pipeline", same_id(spec.pipeline, job.pipeline, names.PIPELINES)),
        ("training_set", same_id(spec.training_set, job.training_set, names.TRAINING_SETS)),
        ("from_model", same_id(spec.from_model, job.from_model, names.MODELS)),
        ("pretrained_weights", spec.pretrained_weights == job.pretrained_weights),
        ("display_name", spec.display_name == job.display_name),
        ("parallelism.processes", (spec.processes or 1) == job.processes),
        ("parallelism.nodes", (spec.nodes or 1) == job.nodes),
    ) if not same]
    recorded = hyperparameters.deserialized(job.hyperparameters)
    differ += [f"hyperparameters.{key}" for key, value in spec.hyperparameters.items()
               if recorded.get(key) != value and not (key == "normalization" and value == "auto")]
    return differ


def _check_pretrained(spec: JobSpec) -> None:
    source = spec.pretrained_weights
    if not source:
        return
    if spec.from_model:
        raise InvalidArgumentError.of("pretrained_weights", "a job starts from from_model or from pretrained weights, "
                                                            "not both")
    if source.startswith(("file:/", "hf:")) and len(source.split(":", 1)[1]) > 1:
        return
    object_keys.check_upload_key(source, field="pretrained_weights")


def _parent(session: Session, name: str, overrides: dict[str, object]) -> ModelRow:
    parent = models.get_model(session, name=name, field="from_model", for_update=True)
    if "architecture" in overrides and overrides["architecture"] != parent.architecture:
        raise FailedPreconditionError(
            f"from_model {names.model(parent.id)} is a {parent.architecture!r} model; it cannot initialise "
            f"architecture {overrides['architecture']!r}"
        )
    return parent


def start_job(session: Session, *, name: str, caller: Principal | None, quota: int) -> JobRow:
    """Queues a PENDING job of the caller's (or any, for an admin), within its owner's quota."""
    job = get_job(session, name=name, for_update=True)
    ownership.check_may_act(caller, owner=job.owner, resource=names.job(job.id), action="start")
    if job.state == S.JOB_STATE_PENDING:  # (any other state is refused by the transition, naming it)
        ownership.check_quota(session, owner=job.owner, limit=quota)
    lifecycle.transition(session, job=job, to=S.JOB_STATE_QUEUED)
    job.start_time = utcnow()
    job.progress = S.Progress(phase=S.PHASE_QUEUED).SerializeToString()
    return job


def request_cancel(session: Session, *, name: str, stop_early: bool, caller: Principal | None,
                   kind: str = TRAINING) -> tuple[JobRow, str]:
    """Cancels a pending/queued job at once; marks an active one CANCELLING and returns the id of
    the node that must be told (empty when nothing runs). Only its owner or an admin may."""
    job = get_job(session, name=name, for_update=True, kind=kind)
    ownership.check_may_act(caller, owner=job.owner, resource=lifecycle.log_name(job),
                            action="stop early" if stop_early else "cancel")
    if job.state in (S.JOB_STATE_PENDING, S.JOB_STATE_QUEUED):
        lifecycle.transition(session, job=job, to=S.JOB_STATE_CANCELLED, reason="cancelled before it ran")
        return job, ""
    if job.state == S.JOB_STATE_CANCELLING:
        return job, job.trainer_node
    lifecycle.transition(session, job=job, to=S.JOB_STATE_CANCELLING,
                         reason="stop early requested" if stop_early else "cancel requested")
    job.cancel_requested, job.stop_early = True, stop_early
    return job, job.trainer_node
