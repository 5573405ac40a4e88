"""The storage collector against real S3 and SQLite/PostgreSQL: expired uploads and orphan objects
go, and nothing still referenced, or written too recently, is ever deleted."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy
from segtrain.common.v1 import common_pb2

from services.common.database import make_engine, session_scope
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from services.common.timeutil import utcnow
from services.pipeline_svc.domain import TileSpec, TrainingSetSpec
from services.pipeline_svc.resources import pipelines, training_sets
from services.pipeline_svc.runtime.collector import Collector
from services.pipeline_svc.tables import SCHEMA, AnalysisRow, JobRow, TrainingSetRow

S = common_pb2
DAY = 86400.0


@pytest.fixture
def store(s3_settings: StorageSettings) -> ObjectStore:
    """A bucket of its own: the collector judges every object in it."""
    own = ObjectStore(s3_settings.model_copy(update={"bucket": f"collect-{uuid.uuid4().hex[:8]}"}))
    own.ensure_bucket()
    return own


@pytest.fixture
def engine(database_url: str) -> Iterator[sqlalchemy.engine.Engine]:
    engine = make_engine(database_url, SCHEMA)
    with session_scope(engine) as session:
        pipelines.seed_pipelines(session)
    yield engine
    engine.dispose()


def a_set(set_id: str, state: int, keys: list[str]) -> TrainingSetRow:
    spec = TrainingSetSpec(pipeline="segmentation", tiles=[TileSpec(image_key=k, annotation_key="") for k in keys])
    return TrainingSetRow(id=set_id, display_name=set_id, pipeline="segmentation", class_names=["a", "b"],
                          snapshot="", tile_count=len(keys), train_tile_count=0, validation_tile_count=0,
                          validation_fraction=0.2, split_seed=0, report=b"", state=state,
                          spec=json.dumps(dataclasses.asdict(spec)).encode())


def test_expired_uploads_and_orphans_go_and_nothing_referenced_or_recent_does(
        engine: sqlalchemy.engine.Engine, store: ObjectStore) -> None:
    kept = {  # referenced, so kept however old
        "uploads/u-preparing/t.png",  # a PREPARING set's tile
        "uploads/u-weights/w.safetensors",  # a PENDING job's pretrained weights
        "uploads/u-analysis/img.png",  # a QUEUED analysis's image
        "training-sets/ts-ready/images/t-0.png",  # rows own these
        "jobs/j-live/attempts/1/tiles.pb",
        "analyses/a-live/inputs.jsonl",
    }
    gone = {
        "uploads/u-old/t.png", "uploads/u-old/m.png",  # nothing reads them
        "uploads/u-done/img.png",  # its analysis has ended
        "training-sets/ts-ghost/images/t-0.png", "jobs/j-ghost/attempts/1/checkpoints/state-latest.pt",
        "analyses/a-ghost/inputs.jsonl",
    }
    for key in kept | gone:
        store.put(key, b"x")
    store.put("analyses/a-live/inputs.jsonl", json.dumps({"tile": "img", "image": "uploads/u-analysis/img.png"})
              .encode() + b"\n")
    store.put("analyses/a-done/inputs.jsonl", json.dumps({"tile": "img", "image": "uploads/u-done/img.png"})
              .encode() + b"\n")
    kept.add("analyses/a-done/inputs.jsonl")
    with session_scope(engine) as session:
        session.add(a_set("ts-ready", training_sets.READY, []))
        session.add(a_set("ts-preparing", training_sets.PREPARING, ["uploads/u-preparing/t.png"]))
        session.flush()
        session.add(JobRow(id="j-live", pipeline="segmentation", training_set="ts-ready", hyperparameters=b"",
                           state=S.JOB_STATE_PENDING, pretrained_weights="uploads/u-weights/w.safetensors"))
        for job_id, state in (("a-live", S.JOB_STATE_QUEUED), ("a-done", S.JOB_STATE_SUCCEEDED)):
            session.add(JobRow(id=job_id, kind="analysis", pipeline="analysis", training_set="", hyperparameters=b"",
                               state=state))
            session.flush()
            session.add(AnalysisRow(id=job_id, model="m-1", training_set="", tile_count=1,
                                    inputs_uri=f"analyses/{job_id}/inputs.jsonl", output=b""))
    collector = Collector(engine, store, interval_s=DAY, upload_ttl_s=7 * DAY, orphan_grace_s=DAY,
                          stopping=threading.Event())
    everything = kept | gone
    # Written a moment ago: nothing is old enough to go, referenced or not.
    assert collector.collect_once() == {}
    assert set(store.list_keys("")) == everything
    # A day and a bit later the orphans go; the unread uploads are not old enough yet.
    removed = collector.collect_once(now=utcnow() + timedelta(days=1, hours=1))
    assert removed == {"training-sets": 1, "jobs": 1, "analyses": 1}
    assert set(store.list_keys("")) == everything - {k for k in gone if not k.startswith("uploads/")}
    # A week later the unread uploads go too; everything referenced stays.
    removed = collector.collect_once(now=utcnow() + timedelta(days=8))
    assert removed == {"uploads": 2}
    assert set(store.list_keys("")) == kept
