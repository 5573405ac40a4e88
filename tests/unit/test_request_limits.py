"""Field size limits of requests, as declared in the protos (services.common.request_limits)."""

from __future__ import annotations

from google.protobuf import descriptor_pool
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2

from services.common import request_limits
from services.common.request_limits import DEFAULT_MAX_ITEMS, DEFAULT_MAX_LEN, field_limits, violations
from services.pipeline_svc import tables


def fields(message: object) -> list[str]:
    return [v.field for v in violations(message)]  # type: ignore[arg-type]


def test_defaults_and_declared_limits_name_the_field_path() -> None:
    ok = pb.CreateTrainingSetRequest(request_id="r" * 128, display_name="d" * 256,
                                     tiles=[pb.TileInput(image_key="k" * DEFAULT_MAX_LEN)] * 3)
    assert fields(ok) == []
    bad = pb.CreateTrainingSetRequest(request_id="r" * 129, display_name="d" * 257, class_names=["c" * 129],
                                      tiles=[pb.TileInput(image_key="k"), pb.TileInput(source_image="s" * 1025)])
    assert sorted(fields(bad)) == ["class_names[0]", "display_name", "request_id", "tiles[1].source_image"]
    too_many = pb.CompareJobsRequest(jobs=["jobs/j"] * (DEFAULT_MAX_ITEMS + 1))
    assert [(v.field, v.description) for v in violations(too_many)] == [("jobs", "at most 1,000 items (got 1,001)")]


def test_nested_messages_and_maps_are_walked() -> None:
    finished = common_pb2.JobFinished(reason="r" * 8192, environment={"torch": "v" * 1025, "k" * 1025: "x"})
    request = metrics_pb2.AppendJobEventsRequest(job="jobs/j-1", events=[
        common_pb2.JobEvent(job="jobs/j-1"), common_pb2.JobEvent(job="jobs/j-1", finished=finished)])
    assert sorted(fields(request)) == ["events[1].finished.environment['kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk']",
                                       "events[1].finished.environment['torch']"]
    finished.reason = "r" * 8193
    assert "events[0].finished.reason" in fields(metrics_pb2.AppendJobEventsRequest(events=[
        common_pb2.JobEvent(finished=finished)]))


def test_a_refusal_names_at_most_a_few_fields() -> None:
    request = pb.CreateTrainingSetRequest(tiles=[pb.TileInput(image_key="k" * 2000)] * 500)
    assert len(violations(request)) == request_limits.MAX_REPORTED


def test_small_messages_are_passed_without_a_walk_and_cannot_break_a_limit() -> None:
    # The fast path's premise: no declared limit is under the size of a message that could break it.
    smallest = request_limits._smallest_limit(pb.CreateTrainingSetRequest.DESCRIPTOR)
    assert smallest == 128
    assert fields(pb.CreateTrainingSetRequest(request_id="r" * 120)) == []
    assert fields(pb.CreateTrainingSetRequest(request_id="r" * 129)) == ["request_id"]


def test_declared_limits_fit_the_database_columns() -> None:
    request_ids = [f for f in _request_fields() if f.name == "request_id"]
    assert request_ids, "no request_id fields found"
    column = tables.JobRow.model_fields["request_id"].metadata  # max_length lives in the metadata
    width = next(m.max_length for m in column if hasattr(m, "max_length"))
    for field in request_ids:
        assert field_limits(field)[0] <= width, field.full_name


def _request_fields() -> list:  # type: ignore[type-arg]
    pool = descriptor_pool.Default()
    assert trainer_pb2.DESCRIPTOR  # the trainer's protos are in the pool
    found = []
    for service in ("segtrain.pipeline.v1.PipelineService", "segtrain.metrics.v1.MetricsService",
                    "segtrain.trainer.v1.TrainerService"):
        for method in pool.FindServiceByName(service).methods:
            found.extend(method.input_type.fields)
    return found


def test_readme_tables_the_declared_limits_exactly() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert request_limits.markdown_table() in readme
