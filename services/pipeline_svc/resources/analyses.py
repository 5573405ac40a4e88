"""Analysis jobs: a registered model applied to uploaded tiles or a training set's tiles, as a
job (JobRow kind "analysis") that the scheduler places on a trainer node like a training job and
whose attempts, cancel, progress and event log are a job's. What it analyses is written once, at
creation, as an inputs object (any number of tiles, never inline in a message); what it produced
is recorded when its node reports success, after checking that every key lies under the
attempt's own prefix."""

from __future__ import annotations

import contextlib
import json
from pathlib import PurePosixPath

from segtrain.common.v1 import common_pb2
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from segcore import admission
from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    check,
)
from services.common.storage import ObjectStore
from services.common.timeutil import utcnow
from services.pipeline_svc import domain
from services.pipeline_svc.resources import (
    hyperparameters,
    jobs,
    lifecycle,
    lookup,
    models,
    ownership,
    pipelines,
    training_sets,
)
from services.pipeline_svc.tables import AnalysisRow, JobRow, ModelRow

S = common_pb2
MAX_IMAGES = 100_000  # per request: keys travel inline in CreateAnalysisJob (≈ 100 B each)
# Tiles per forward pass on the node; what admission sizes the job's memory by.
BATCH_SIZE = 8
MAX_DISPLAY_NAME = 200


def create_analysis(engine: Engine, store: ObjectStore, spec: domain.AnalysisJobSpec, *, quota: int = 0
                    ) -> domain.AnalysisJob:
    """A QUEUED analysis job. Its inputs object is written before its rows, so a job never names
    inputs that are not there."""
    _check_spec(spec)
    with session_scope(engine) as session:
        previous = lookup.by_request_id(session, table=JobRow, request_id=spec.request_id)
        if previous is not None:
            return repeated_analysis(store, get_analysis(session, name=names.analysis(previous.id)), spec)
        pipeline = pipelines.get_pipeline(session, name=spec.pipeline or names.pipeline(pipelines.ANALYSIS_PIPELINE),
                                          field="pipeline")
        if pipeline.type != pipelines.ANALYSIS:
            raise FailedPreconditionError(f"{names.pipeline(pipeline.id)} is not an ANALYSIS pipeline")
        model = models.get_model(session, name=spec.model, field="model")
        set_id, inputs = _inputs(session, spec)
        job = JobRow(
            id=names.new_id("a"), kind=jobs.ANALYSIS, display_name=spec.display_name, pipeline=pipeline.id,
            training_set=set_id, from_model=model.id, state=S.JOB_STATE_PENDING,
            hyperparameters=hyperparameters.serialized({"architecture": model.architecture,
                                                        "batch_size": BATCH_SIZE}),
            request_id=spec.request_id or None, owner=spec.owner,
        )
        jobs.check_fits(session, shape(job, model))
    inputs_uri = object_keys.analysis_inputs(job.id)
    store.put(inputs_uri, "".join(json.dumps({"tile": t, "image": k}) + "\n" for t, k in inputs).encode(),
              content_type="application/jsonl")
    analysis = AnalysisRow(id=job.id, model=model.id, training_set=set_id, tile_count=len(inputs),
                           inputs_uri=inputs_uri)
    try:
        with session_scope(engine, serialized=True) as session:
            _still_there(session, model_id=model.id, set_id=set_id)
            ownership.check_quota(session, owner=job.owner, limit=quota)  # it is queued at once
            lifecycle.created(session, job)
            lifecycle.emit_control_event(session, job=job, event=S.JobEvent(state_change=S.StateChange(
                state=S.JOB_STATE_PENDING)))
            lifecycle.transition(session, job=job, to=S.JOB_STATE_QUEUED)
            job.start_time = utcnow()
            job.progress = S.Progress(phase=S.PHASE_QUEUED, tiles=len(inputs)).SerializeToString()
            session.add(job)
            session.flush()  # the job row first: the analysis row's key refers to it
            session.add(analysis)
    except BaseException as exc:
        with contextlib.suppress(UnavailableError):  # nothing is left behind (the collector's, else)
            store.delete_many([inputs_uri])
        if isinstance(exc, IntegrityError) and spec.request_id:  # the same request, made concurrently
            with session_scope(engine) as session:
                previous = lookup.by_request_id(session, table=JobRow, request_id=spec.request_id)
                if previous is not None:
                    return repeated_analysis(store, get_analysis(session, name=names.analysis(previous.id)), spec)
        raise
    return domain.AnalysisJob(job, analysis)


def _still_there(session: Session, *, model_id: str, set_id: str) -> None:
    """The model and set the analysis uses, locked: neither was deleted since they were read, and
    neither can be before the analysis is recorded."""
    models.get_model(session, name=names.model(model_id), field="model", for_update=True)
    if set_id:
        training_sets.ready_training_set(session, name=names.training_set(set_id), field="training_set",
                                         for_update=True)


def repeated_analysis(store: ObjectStore, previous: domain.AnalysisJob, spec: domain.AnalysisJobSpec
                      ) -> domain.AnalysisJob:
    """The analysis an earlier request with the same request_id created, if this one asks for the
    same (its images compared by file name: a retried upload lands under other keys);
    INVALID_ARGUMENT naming request_id (and what differs) otherwise."""
    job, row = previous.job, previous.analysis

    def bare(name: str, collection: str) -> str:
        return name.removeprefix(f"{collection}/") if name else ""

    def image_names() -> list[str]:
        if row.training_set:
            return []
        lines = store.get(row.inputs_uri).decode().splitlines()
        return [PurePosixPath(json.loads(line)["image"]).name for line in lines]

    differ = [field for field, same in (
        ("model", bare(spec.model, names.MODELS) == row.model),
        ("training_set", bare(spec.training_set, names.TRAINING_SETS) == row.training_set),
        ("pipeline", not spec.pipeline or bare(spec.pipeline, names.PIPELINES) == job.pipeline),
        ("display_name", spec.display_name == job.display_name),
        ("image_keys", [PurePosixPath(k).name for k in spec.image_keys] == image_names()),
    ) if not same]
    if differ:
        raise InvalidArgumentError.of("request_id", f"already used for {names.analysis(job.id)}, created with other "
                                                    f"parameters ({', '.join(differ)}); use a new request_id")
    return previous


def shape(job: JobRow, model: ModelRow) -> admission.JobShape:
    """What decides the analysis's memory: the model's architecture and tile size, a batch of
    BATCH_SIZE (the training estimate, an upper bound for a forward without gradients)."""
    return jobs.job_shape(job, tile_size=model.tile_size)


def _check_spec(spec: domain.AnalysisJobSpec) -> None:
    v: list[FieldViolation] = []
    if bool(spec.image_keys) == bool(spec.training_set):
        v.append(FieldViolation("image_keys", "name the tiles to analyse: image_keys or training_set, not both"))
    if len(spec.image_keys) > MAX_IMAGES:
        v.append(FieldViolation("image_keys", f"at most {MAX_IMAGES} images per analysis; split the request or "
                                              "analyse a training set"))
    if len(spec.display_name) > MAX_DISPLAY_NAME:
        v.append(FieldViolation("display_name", f"at most {MAX_DISPLAY_NAME} characters"))
    check(v)
    stems: set[str] = set()
    for i, key in enumerate(spec.image_keys):
        try:
            object_keys.check_upload_key(key, field=f"image_keys[{i}]")
        except InvalidArgumentError as exc:
            v += exc.violations
        stem = PurePosixPath(key).stem
        if stem in stems:  # masks are named by stem: a.png and a.tif would overwrite each other
            v.append(FieldViolation(f"image_keys[{i}]", f"duplicate image name {stem!r}"))
        stems.add(stem)
        if len(v) >= 50:
            break
    check(v)


def _inputs(session: Session, spec: domain.AnalysisJobSpec) -> tuple[str, list[tuple[str, str]]]:
    """(the training set's id or "", the (tile name, image key) pairs in order)."""
    if spec.image_keys:
        return "", [(PurePosixPath(k).stem, k) for k in spec.image_keys]
    training_set = training_sets.ready_training_set(session, name=spec.training_set, field="training_set")
    return training_set.id, [(t.name, t.image_uri) for t in training_sets.tiles_of(session, set_id=training_set.id)]


def get_analysis(session: Session, *, name: str, for_update: bool = False) -> domain.AnalysisJob:
    job = jobs.get_job(session, name=name, for_update=for_update, kind=jobs.ANALYSIS)
    analysis = session.get(AnalysisRow, job.id)
    if analysis is None:  # never: both rows are written in one transaction
        raise NotFoundError(names.analysis(job.id))
    return domain.AnalysisJob(job, analysis)


def list_analyses(session: Session, *, pipeline: str, page_size: int, page_token: str, owner: str = ""
                  ) -> tuple[list[domain.AnalysisJob], str]:
    rows, token = jobs.list_jobs(session, pipeline=pipeline, page_size=page_size, page_token=page_token,
                                 owner=owner, kind=jobs.ANALYSIS)
    found = {a.id: a for a in session.exec(select(AnalysisRow).where(col(AnalysisRow.id).in_([r.id for r in rows])))}
    return [domain.AnalysisJob(r, found[r.id]) for r in rows if r.id in found], token


def output_of(analysis: AnalysisRow) -> common_pb2.AnalysisOutput | None:
    return common_pb2.AnalysisOutput.FromString(analysis.output) if analysis.output else None


def record_output(session: Session, *, job: JobRow, output: common_pb2.AnalysisOutput) -> None:
    """Keeps what the attempt reports it wrote; FAILED_PRECONDITION if anything lies outside the
    attempt's own prefix (a node reports only its own files)."""
    prefix = object_keys.analysis_attempt_prefix(job.id, job.attempt)
    artifacts = [output.manifest, output.tiles_csv, output.tiles_json, output.classes_csv, output.classes_json,
                 *output.tile_pages]
    for artifact in artifacts:
        if not artifact.uri.startswith(prefix):
            raise FailedPreconditionError(f"the node reported result {artifact.uri!r} outside {prefix!r}")
    analysis = session.get(AnalysisRow, job.id, with_for_update=True)
    if analysis is None:
        raise FailedPreconditionError(f"{names.analysis(job.id)} has no analysis record")
    analysis.output = output.SerializeToString()
    session.add(analysis)


def tile_page(store: ObjectStore, analysis: domain.AnalysisJob, page_token: str) -> tuple[list[dict], str]:  # type: ignore[type-arg]
    """One page of a SUCCEEDED analysis's per-tile records and the next page's token."""
    output = output_of(analysis.analysis)
    if analysis.job.state != S.JOB_STATE_SUCCEEDED or output is None:
        raise FailedPreconditionError(f"{names.analysis(analysis.job.id)} has no results: it is "
                                      f"{S.JobState.Name(analysis.job.state).removeprefix('JOB_STATE_')}")  # type: ignore[arg-type]
    index = 0
    if page_token:
        if not page_token.isdigit() or int(page_token) >= len(output.tile_pages):
            raise InvalidArgumentError.of("page_token", "not a token this analysis gave")
        index = int(page_token)
    if not output.tile_pages:
        return [], ""
    records = json.loads(store.get(output.tile_pages[index].uri))
    following = str(index + 1) if index + 1 < len(output.tile_pages) else ""
    return records, following
