"""Deleting training sets, jobs, models and analyses (AIP-135), never anything still in use.

Each delete checks, in a serialized transaction (services.common.database), that nothing that
has not ended uses the resource, removes its rows, and returns the object-key prefixes (or keys)
the caller deletes once the transaction has committed: a failure in between leaves orphan
objects, never rows that name missing objects. Only the owner or an admin may delete
(resources.ownership).

* A training set: READY or FAILED, and no job or analysis that has not ended uses it.
* A job: ended, and its model deleted first (the model's weights lie under the job's keys).
* A model: no job that has not ended starts from it, no analysis that has not ended uses it.
* An analysis job: ended.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, delete
from sqlmodel import Session, col, select

from services.common import job_states, names, object_keys
from services.common.errors import FailedPreconditionError, NotFoundError
from services.common.tokens import Principal
from services.pipeline_svc.resources import jobs, lifecycle, models, ownership, training_sets
from services.pipeline_svc.tables import AnalysisRow, JobRow, ModelRow, OutboxRow, TileRow, TrainingSetRow

_SHOWN = 5  # users named in a refusal


def delete_training_set(session: Session, *, name: str, caller: Principal | None) -> list[str]:
    """Deletes the set's rows; returns the prefix of its objects."""
    set_id = names.parse_name(name, names.TRAINING_SETS)
    row = session.get(TrainingSetRow, set_id, with_for_update=True)
    if row is None:
        raise NotFoundError(names.training_set(set_id))
    ownership.check_may_act(caller, owner=row.owner, resource=names.training_set(set_id), action="delete")
    if row.state == training_sets.PREPARING:
        raise FailedPreconditionError(f"{names.training_set(set_id)} is being prepared; delete it once it is "
                                      "READY or FAILED")
    _refuse_if_used(session, col(JobRow.training_set) == set_id, names.training_set(set_id), "uses it")
    session.execute(delete(TileRow).where(col(TileRow.training_set) == set_id))
    session.delete(row)
    return [object_keys.training_set_prefix(set_id)]


def delete_job(session: Session, *, name: str, caller: Principal | None) -> list[str]:
    """Deletes an ended job's rows; returns the prefix of its objects."""
    job = jobs.get_job(session, name=name, for_update=True)
    _check_ended(job, caller)
    model = session.get(ModelRow, models.model_id_for(job.id))
    if model is not None:
        raise FailedPreconditionError(f"{names.job(job.id)} trained {names.model(model.id)}, whose weights it "
                                      "holds: delete the model first")
    _delete_job_rows(session, job)
    return [object_keys.job_prefix(job.id)]


def delete_model(session: Session, *, name: str, caller: Principal | None) -> list[str]:
    """Deletes a model's row; returns the keys of its weights and the prefix of its exports."""
    model_id = names.parse_name(name, names.MODELS)
    model = session.get(ModelRow, model_id, with_for_update=True)
    if model is None:
        raise NotFoundError(names.model(model_id))
    ownership.check_may_act(caller, owner=model.owner, resource=names.model(model_id), action="delete")
    _refuse_if_used(session, col(JobRow.from_model) == model_id, names.model(model_id), "starts from or uses it")
    job = lifecycle.locked(session, model.job)
    if job is not None:
        job.model = ""
        session.add(job)
    stored = [*models.weights_keys(model), object_keys.model_exports_prefix(model.job)]
    session.delete(model)
    return stored


def delete_analysis(session: Session, *, name: str, caller: Principal | None) -> list[str]:
    """Deletes an ended analysis job's rows; returns the prefix of its objects."""
    job = jobs.get_job(session, name=name, for_update=True, kind=jobs.ANALYSIS)
    _check_ended(job, caller)
    session.execute(delete(AnalysisRow).where(col(AnalysisRow.id) == job.id))
    _delete_job_rows(session, job)
    return [object_keys.analysis_prefix(job.id)]


def _check_ended(job: JobRow, caller: Principal | None) -> None:
    resource = lifecycle.log_name(job)
    ownership.check_may_act(caller, owner=job.owner, resource=resource, action="delete")
    if job.state not in job_states.TERMINAL:
        raise FailedPreconditionError(f"{resource} is {job_states.state_name(job.state)}; cancel it and wait "
                                      "until it has ended, then delete it")


def _delete_job_rows(session: Session, job: JobRow) -> None:
    # Its control events not yet relayed go too: the job they describe is gone. In their place,
    # in the same transaction, the request that the metrics service delete the job's log.
    log = lifecycle.log_name(job)
    session.execute(delete(OutboxRow).where(col(OutboxRow.job) == log))
    session.add(OutboxRow(job=log, payload=b"", forget_log=True))
    session.delete(job)


def _refuse_if_used(session: Session, uses: ColumnElement[bool], resource: str, how: str) -> None:
    users = list(session.exec(select(JobRow).where(uses, col(JobRow.state).not_in(job_states.TERMINAL))
                              .limit(_SHOWN + 1)))
    if users:
        shown = ", ".join(lifecycle.log_name(u) for u in users[:_SHOWN]) + (", …" if len(users) > _SHOWN else "")
        raise FailedPreconditionError(f"{resource} cannot be deleted: {shown} {how} and has not ended")
