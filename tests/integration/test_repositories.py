"""Each service's tables and repository functions on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
import sqlalchemy
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from services.common import object_keys
from services.common.database import make_engine, session_scope
from services.common.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from services.metrics_svc import repository as events
from services.metrics_svc.tables import SCHEMA as METRICS_SCHEMA
from services.pipeline_svc import converters
from services.pipeline_svc.domain import PipelineSpec
from services.pipeline_svc.resources import jobs, lifecycle, models, pipelines
from services.pipeline_svc.tables import SCHEMA as PIPELINE_SCHEMA
from services.pipeline_svc.tables import JobRow, ModelRow, OutboxRow, TrainingSetRow


def _event(attempt: int, source_seq: int) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(attempt=attempt, source_seq=source_seq,
                               batch_progress=common_pb2.BatchProgress(batch=source_seq))


def seed(engine: sqlalchemy.engine.Engine) -> None:
    with session_scope(engine) as session:
        pipelines.seed_pipelines(session)


def add_job(engine: sqlalchemy.engine.Engine, **job: object) -> None:
    """Job j-1 on a training set "ts" of the seeded pipeline."""
    with session_scope(engine) as session:
        session.add(TrainingSetRow(id="ts", display_name="ts", pipeline="segmentation", class_names=["a", "b"],
                                   snapshot="sha256:0", tile_count=2, train_tile_count=1, validation_tile_count=1,
                                   validation_fraction=0.2, split_seed=0, report=b""))
        session.add(JobRow(id="j-1", pipeline="segmentation", training_set="ts", hyperparameters=b"", **job))


def test_each_service_creates_only_its_own_tables(database_url: str) -> None:
    engine = make_engine(database_url, METRICS_SCHEMA)
    assert set(sqlalchemy.inspect(engine).get_table_names()) == {"job_events", "alembic_version_metrics"}
    engine.dispose()


def test_event_log_numbers_gap_free_and_skips_duplicates(database_url: str) -> None:
    engine = make_engine(database_url, METRICS_SCHEMA)
    with session_scope(engine) as session:
        stored = events.append(session, job="jobs/a", events=[_event(1, 1), _event(1, 2), _event(0, 1)])
        assert [e.seq for e in stored] == [1, 2, 3]
    with session_scope(engine) as session:
        stored = events.append(session, job="jobs/a", events=[_event(1, 2), _event(1, 3)])
        assert [e.seq for e in stored] == [4]
        events.append(session, job="jobs/b", events=[_event(1, 1)])
    with session_scope(engine) as session:
        assert [e.seq for e in events.read(session, job="jobs/a", after_seq=1, limit=10)] == [2, 3, 4]
        assert events.last_seq(session, job="jobs/b") == 1
        assert events.last_source_seq(session, job="jobs/a", attempt=1) == 3
    engine.dispose()


def test_the_same_seq_cannot_be_written_twice(database_url: str) -> None:
    """Two writers racing on one job: the primary key rejects the second, nothing is overwritten."""
    engine = make_engine(database_url, METRICS_SCHEMA)
    from services.metrics_svc.tables import JobEventRow

    row = dict(job="jobs/a", seq=1, attempt=1, kind="x", event_time=datetime.now(UTC),
               payload=b"")
    with session_scope(engine) as session:
        session.add(JobEventRow(source_seq=1, **row))
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(JobEventRow(source_seq=2, **row))
    engine.dispose()


def test_pipelines_seed_create_and_conflict(database_url: str) -> None:
    engine = make_engine(database_url, PIPELINE_SCHEMA)
    seed(engine)
    seed(engine)  # idempotent
    spec = PipelineSpec(pipeline_id="6panorama", request_id="r-1", display_name="6PanoramaTrainSet20241209",
                        type=pb.Pipeline.TYPE_TRAINING, class_names=["background", "fibre"], tile_size=512)
    with session_scope(engine) as session:
        created = pipelines.create_pipeline(session, spec=spec, architectures=[])
    with session_scope(engine) as session:
        again = pipelines.create_pipeline(session, spec=spec, architectures=[])  # a retried request
    assert again.id == created.id
    with pytest.raises(AlreadyExistsError), session_scope(engine) as session:
        pipelines.create_pipeline(session, spec=dataclasses.replace(spec, request_id="r-2"), architectures=[])
    with session_scope(engine) as session:
        rows, token = pipelines.list_pipelines(session, page_size=2, page_token="")
        assert [r.id for r in rows] == ["segmentation", "analysis"] and token
        rows, token = pipelines.list_pipelines(session, page_size=2, page_token=token)
        assert [r.id for r in rows] == ["6panorama"] and token == ""
        with pytest.raises(NotFoundError):
            pipelines.get_pipeline(session, name="pipelines/missing")
    engine.dispose()


def test_job_state_machine_persists_and_queues_events(database_url: str) -> None:
    engine = make_engine(database_url, PIPELINE_SCHEMA)
    seed(engine)
    add_job(engine, state=common_pb2.JOB_STATE_PENDING)
    with session_scope(engine, serialized=True) as session:
        job = jobs.get_job(session, name="jobs/j-1", for_update=True)
        lifecycle.transition(session, job=job, to=common_pb2.JOB_STATE_QUEUED)
    with session_scope(engine, serialized=True) as session:
        job = jobs.get_job(session, name="jobs/j-1", for_update=True)
        assert job.state == common_pb2.JOB_STATE_QUEUED and job.control_seq == 1
        with pytest.raises(FailedPreconditionError):
            lifecycle.transition(session, job=job, to=common_pb2.JOB_STATE_SUCCEEDED)
    # A job read without its lock (or outside a serialized session) cannot be changed at all.
    with session_scope(engine, serialized=True) as session, pytest.raises(RuntimeError, match=r"lifecycle\.locked"):
        lifecycle.transition(session, job=jobs.get_job(session, name="jobs/j-1"), to=common_pb2.JOB_STATE_CANCELLED)
    with session_scope(engine) as session, pytest.raises(RuntimeError, match="serialized"):
        jobs.get_job(session, name="jobs/j-1", for_update=True)
    with session_scope(engine) as session:
        outbox = list(session.exec(sqlalchemy.select(OutboxRow.payload)).scalars())  # type: ignore[call-overload]
        assert len(outbox) == 1
        event = common_pb2.JobEvent.FromString(outbox[0])
        assert (event.job, event.attempt, event.source_seq) == ("jobs/j-1", 0, 1)
        assert event.state_change.state == common_pb2.JOB_STATE_QUEUED
        # The refused move left no trace.
        assert jobs.get_job(session, name="jobs/j-1").state == common_pb2.JOB_STATE_QUEUED
    engine.dispose()


@pytest.mark.parametrize(("attempt", "state"), [(2, common_pb2.JOB_STATE_QUEUED), (5, common_pb2.JOB_STATE_FAILED)])
def test_a_lost_job_is_requeued_until_its_attempts_are_used_up(database_url: str, attempt: int, state: int) -> None:
    engine = make_engine(database_url, PIPELINE_SCHEMA)
    seed(engine)
    add_job(engine, state=common_pb2.JOB_STATE_RUNNING, attempt=attempt, trainer_node="n1")
    with session_scope(engine, serialized=True) as session:
        lifecycle.requeue(session, job=jobs.get_job(session, name="jobs/j-1", for_update=True),
                          reason="node n1 stopped responding", max_attempts=5)
    with session_scope(engine) as session:
        job = jobs.get_job(session, name="jobs/j-1")
        assert job.state == state and job.trainer_node == ""
        if state == common_pb2.JOB_STATE_FAILED:
            assert "gave up after 5 attempts" in job.failure_reason and "node n1" in job.failure_reason
    engine.dispose()


def _finished(job_id: str, attempt: int, sha: str = "ab" * 32) -> common_pb2.JobFinished:
    prefix = object_keys.attempt_prefix(job_id, attempt)
    return common_pb2.JobFinished(
        state=common_pb2.JOB_STATE_SUCCEEDED,
        best_model=common_pb2.Artifact(uri=object_keys.model_weights(prefix, "best"), sha256=sha),
        final_model=common_pb2.Artifact(uri=object_keys.model_weights(prefix, "final"), sha256=sha))


def test_a_model_is_registered_only_from_its_own_attempts_keys_with_its_sha256(database_url: str) -> None:
    """A stale attempt's weights, or weights without a hash, are never registered; the hash of
    what is registered is recorded for every later load to check."""
    engine = make_engine(database_url, PIPELINE_SCHEMA)
    seed(engine)
    add_job(engine, state=common_pb2.JOB_STATE_RUNNING, attempt=2, trainer_node="n1", owner="alice")
    with session_scope(engine) as session:
        job = jobs.get_job(session, name="jobs/j-1")
        for refused, why in ((_finished("j-1", 1), "attempts/2/models/best"),  # the earlier attempt's file
                             (_finished("j-2", 2), "attempts/2/models/best"),  # another job's file
                             (_finished("j-1", 2, sha=""), "sha256")):
            with pytest.raises(FailedPreconditionError, match=why):
                models.register_model(session, job=job, finished=refused)
        row = models.register_model(session, job=job, finished=_finished("j-1", 2))
    with session_scope(engine) as session:
        stored = session.get(ModelRow, row.id)
        assert stored is not None and stored.weights_sha256 == "ab" * 32
        assert stored.owner == "alice" and converters.model_message(stored).owner == "alice"  # its job's owner
        assert converters.model_ref(stored).weights_sha256 == "ab" * 32
    engine.dispose()


def test_deletes_remove_rows_in_an_order_both_databases_accept(database_url: str) -> None:
    """Tiles before their set, the analysis record before its job, the model before its job."""
    from services.pipeline_svc.resources import deletion
    from services.pipeline_svc.tables import AnalysisRow, TileRow

    engine = make_engine(database_url, PIPELINE_SCHEMA)
    seed(engine)
    add_job(engine, state=common_pb2.JOB_STATE_SUCCEEDED, attempt=2)
    with session_scope(engine) as session:
        session.add(TileRow(training_set="ts", name="t", image_uri="training-sets/ts/images/t.png",
                            mask_uri="training-sets/ts/masks/t.png", source_image="t", width=8, height=8,
                            validation=False))
        models.register_model(session, job=session.get(JobRow, "j-1"), finished=_finished("j-1", 2))  # type: ignore[arg-type]
        session.add(JobRow(id="a-1", kind="analysis", pipeline="analysis", training_set="ts", from_model="m-1",
                           hyperparameters=b"", state=common_pb2.JOB_STATE_CANCELLED))
        session.flush()
        session.add(AnalysisRow(id="a-1", model="m-1", training_set="ts", tile_count=1, inputs_uri="x", output=b""))
    with session_scope(engine, serialized=True) as session:
        assert deletion.delete_analysis(session, name="analyses/a-1", caller=None) == ["analyses/a-1/"]
    with session_scope(engine, serialized=True) as session:
        assert deletion.delete_model(session, name="models/m-1", caller=None) == [
            *(object_keys.model_weights(object_keys.attempt_prefix("j-1", 2), kind) for kind in ("best", "final")),
            object_keys.model_exports_prefix("j-1")]
    with session_scope(engine, serialized=True) as session:
        assert deletion.delete_job(session, name="jobs/j-1", caller=None) == ["jobs/j-1/"]
    with session_scope(engine, serialized=True) as session:
        assert deletion.delete_training_set(session, name="trainingSets/ts", caller=None) == ["training-sets/ts/"]
    with session_scope(engine) as session:
        for table in (JobRow, ModelRow, TrainingSetRow, TileRow, AnalysisRow):
            assert list(session.exec(select(table))) == [], table.__name__
    engine.dispose()
