"""Every RPC of every service is authenticated and authorised, streams included: no token, a bad
token or too small a role is refused before anything runs, and leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.auth import Role, write_tokens_file
from services.common.server import create_server
from services.common.settings import (
    MetricsSettings,
    PipelineSettings,
    SecuritySettings,
    ServingSettings,
    StorageSettings,
    TrainerSettings,
)
from services.common.tokens import LISTED_ROLES
from services.metrics_svc import app as metrics_app
from services.pipeline_svc import app as pipeline_app
from services.trainer_svc import app as trainer_app
from tests.helpers import NODE_KEY, node_token_of, row_counts

TOKENS = {role: f"token-{role.name.lower()}-0123456789" for role in LISTED_ROLES}


@dataclass
class Secured:
    pipeline: str
    metrics: str
    trainer: str
    pipeline_db: str


@pytest.fixture
def secured(tmp_path: Path, s3_settings: StorageSettings) -> Iterator[Secured]:
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {token: (f"user-{role.name.lower()}", role) for role, token in TOKENS.items()})
    security = SecuritySettings(auth_tokens_file=tokens_file, service_token=SecretStr(TOKENS[Role.SERVICE]),
                                node_key=SecretStr(NODE_KEY))
    metrics, m_port, _, _ = metrics_app.build(
        MetricsSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'm.db'}"), security)
    metrics.start()
    db = f"sqlite:///{tmp_path / 'p.db'}"
    pipeline, p_port, _, service = pipeline_app.build(PipelineSettings(
        listen="127.0.0.1:0", database_url=db, metrics_address=f"127.0.0.1:{m_port}"), s3_settings, security)
    service.start()
    pipeline.start()
    trainer, t_port, _, _, _ = trainer_app.build(
        TrainerSettings(listen="127.0.0.1:0", node_id="t-1", token=SecretStr(node_token_of("t-1"))), s3_settings,
        SecuritySettings())
    trainer.start()
    try:
        yield Secured(f"127.0.0.1:{p_port}", f"127.0.0.1:{m_port}", f"127.0.0.1:{t_port}", db)
    finally:
        service.stop()
        for server in (pipeline, metrics, trainer):
            server.stop(0).wait()


def call(address: str, token: str | None, invoke: Callable[[grpc.Channel, list[tuple[str, str]]], object]) -> object:
    with grpc.insecure_channel(address) as channel:
        metadata = [("authorization", f"Bearer {token}")] if token else []
        return invoke(channel, metadata)


def pipe(method: str, request: object) -> Callable[[grpc.Channel, list[tuple[str, str]]], object]:
    return lambda ch, md: getattr(pipeline_pb2_grpc.PipelineServiceStub(ch), method)(request, metadata=md, timeout=10)


def metr(method: str, request: object, stream: bool = False) -> Callable[[grpc.Channel, list[tuple[str, str]]], object]:
    def invoke(ch: grpc.Channel, md: list[tuple[str, str]]) -> object:
        result = getattr(metrics_pb2_grpc.MetricsServiceStub(ch), method)(request, metadata=md, timeout=10)
        return next(iter(result)) if stream else result
    return invoke


def trn(method: str, request: object, stream: bool = False) -> Callable[[grpc.Channel, list[tuple[str, str]]], object]:
    def invoke(ch: grpc.Channel, md: list[tuple[str, str]]) -> object:
        result = getattr(trainer_pb2_grpc.TrainerServiceStub(ch), method)(request, metadata=md, timeout=10)
        return next(iter(result)) if stream else result
    return invoke


CREATE_JOB = pipeline_pb2.CreateJobRequest(pipeline="pipelines/segmentation", training_set="trainingSets/x")
APPEND = metrics_pb2.AppendJobEventsRequest(job="jobs/j-1", events=[common_pb2.JobEvent(
    attempt=1, source_seq=1, warning=common_pb2.Warning(code="X"))])
CASES = [
    # (service, call, token role or None/"bad", expected code)
    ("pipeline", pipe("ListPipelines", pipeline_pb2.ListPipelinesRequest()), None, grpc.StatusCode.UNAUTHENTICATED),
    ("pipeline", pipe("ListPipelines", pipeline_pb2.ListPipelinesRequest()), "bad", grpc.StatusCode.UNAUTHENTICATED),
    ("pipeline", pipe("CreateJob", CREATE_JOB), None, grpc.StatusCode.UNAUTHENTICATED),
    ("pipeline", pipe("CreateJob", CREATE_JOB), Role.VIEWER, grpc.StatusCode.PERMISSION_DENIED),
    ("pipeline", pipe("CreatePipeline", pipeline_pb2.CreatePipelineRequest(pipeline_id="p")), Role.TRAINER,
     grpc.StatusCode.PERMISSION_DENIED),
    ("pipeline", pipe("RegisterTrainerNode", pipeline_pb2.RegisterTrainerNodeRequest(node_id="n", address="h:1")),
     Role.TRAINER, grpc.StatusCode.PERMISSION_DENIED),
    ("pipeline", pipe("CreateUpload", pipeline_pb2.CreateUploadRequest(file_names=["a.png"])), Role.VIEWER,
     grpc.StatusCode.PERMISSION_DENIED),
    ("metrics", metr("AppendJobEvents", APPEND), Role.ADMIN, grpc.StatusCode.PERMISSION_DENIED),
    ("metrics", metr("WatchJobEvents", metrics_pb2.WatchJobEventsRequest(job="jobs/j-1"), stream=True), None,
     grpc.StatusCode.UNAUTHENTICATED),
    ("metrics", metr("WatchJobEvents", metrics_pb2.WatchJobEventsRequest(job="jobs/j-1"), stream=True), "bad",
     grpc.StatusCode.UNAUTHENTICATED),
    ("pipeline", pipe("HeartbeatTrainerNode", pipeline_pb2.HeartbeatTrainerNodeRequest(name="trainerNodes/n")),
     Role.ADMIN, grpc.StatusCode.PERMISSION_DENIED),
    # A trainer node accepts its own token only: not an admin's, not even the services' own.
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1")), Role.ADMIN,
     grpc.StatusCode.UNAUTHENTICATED),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1")), Role.SERVICE,
     grpc.StatusCode.UNAUTHENTICATED),
    ("trainer", trn("WatchJobRun", trainer_pb2.WatchJobRunRequest(job="jobs/j-1"), stream=True), Role.TRAINER,
     grpc.StatusCode.UNAUTHENTICATED),
    ("trainer", trn("AnalyzeTiles", trainer_pb2.AnalyzeTilesRequest()), None, grpc.StatusCode.UNAUTHENTICATED),
]


@pytest.mark.parametrize(("service", "invoke", "role", "code"), CASES)
def test_refused_without_the_right_token(secured: Secured, service: str, invoke: Callable[..., object],
                                         role: Role | str | None, code: grpc.StatusCode) -> None:
    rows = row_counts(secured.pipeline_db, ["jobs", "pipelines", "trainer_nodes"])
    token = None if role is None else "not-a-token" if role == "bad" else TOKENS[role]  # type: ignore[index]
    with pytest.raises(grpc.RpcError) as info:
        call(getattr(secured, service), token, invoke)
    assert info.value.code() == code
    assert "token-" not in info.value.details() and "not-a-token" not in info.value.details()
    assert row_counts(secured.pipeline_db, ["jobs", "pipelines", "trainer_nodes"]) == rows


def test_the_right_roles_pass(secured: Secured) -> None:
    listed = call(secured.pipeline, TOKENS[Role.VIEWER], pipe("ListPipelines", pipeline_pb2.ListPipelinesRequest()))
    assert listed.pipelines  # type: ignore[attr-defined]
    appended = call(secured.metrics, TOKENS[Role.SERVICE], metr("AppendJobEvents", APPEND))
    assert appended.last_seq == 1  # type: ignore[attr-defined]
    first = call(secured.metrics, TOKENS[Role.VIEWER],
                 metr("WatchJobEvents", metrics_pb2.WatchJobEventsRequest(job="jobs/j-1"), stream=True))
    assert first.event.seq == 1  # type: ignore[attr-defined]
    # The pipeline service reaches the metrics service with its own service token.
    job_error = None
    try:
        call(secured.pipeline, TOKENS[Role.TRAINER], pipe("CreateJob", CREATE_JOB))
    except grpc.RpcError as exc:
        job_error = exc.code()
    assert job_error == grpc.StatusCode.NOT_FOUND  # authorised; the training set does not exist
    # A trainer node answers calls carrying its own token.
    cancelled = call(secured.trainer, node_token_of("t-1"),
                     trn("CancelJobRun", trainer_pb2.CancelJobRunRequest(job="jobs/j-1")))
    assert cancelled.found is False  # type: ignore[attr-defined]


def test_health_checking_needs_no_token(secured: Secured) -> None:
    for address in (secured.pipeline, secured.metrics, secured.trainer):
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_servers_refuse_to_listen_openly_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="without authentication"):
        create_server("0.0.0.0:0", [], [], access={}, security=SecuritySettings(), serving=ServingSettings())
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {})
    with pytest.raises(RuntimeError, match="plaintext"):
        create_server("0.0.0.0:0", [], [], access={}, security=SecuritySettings(auth_tokens_file=tokens_file),
                      serving=ServingSettings())


MALFORMED = [
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/../x", attempt=1)), "job"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1", attempt=0, output_prefix="jobs/j-1/",
                                                        tiles=[trainer_pb2.TrainingTile(
                                                            name="a", image_uri="training-sets/s/a.png",
                                                            mask_uri="training-sets/s/a.png")])), "attempt"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1", attempt=1, output_prefix="jobs/j-1/attempts/1/",
                                                        tiles=[trainer_pb2.TrainingTile(
                                                            name="a", image_uri="training-sets/s/a.png",
                                                            mask_uri="training-sets/s/a.png")])), "tiles"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(
        job="jobs/j-1", attempt=1, output_prefix="jobs/j-1/attempts/1/",
        tile_manifest=common_pb2.Artifact(uri="jobs/j-2/attempts/1/tiles.pb"))), "tile_manifest.uri"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(
        job="jobs/j-1", attempt=1, output_prefix="../outside/",
        tile_manifest=common_pb2.Artifact(uri="../outside/tiles.pb"))), "output_prefix"),
    ("trainer", trn("AnalyzeTiles", trainer_pb2.AnalyzeTilesRequest(output_prefix="analyses/../../x/")),
     "output_prefix"),
    ("metrics", metr("WatchJobEvents", metrics_pb2.WatchJobEventsRequest(job="jobs/j-1", after_seq=-1),
                     stream=True), "after_seq"),
    ("metrics", metr("RenderJobCharts", metrics_pb2.RenderJobChartsRequest(jobs=["jobs/j-1"], width=10)), "width"),
    ("metrics", metr("ListJobEvents", metrics_pb2.ListJobEventsRequest(job="jobs/j-1", page_size=10**6)),
     "page_size"),
    # Field sizes declared in the protos hold for service callers too.
    ("metrics", metr("AppendJobEvents", metrics_pb2.AppendJobEventsRequest(job="jobs/j-1", events=[
        common_pb2.JobEvent(job="jobs/j-1", attempt=1, source_seq=1,
                            finished=common_pb2.JobFinished(reason="r" * 10_000))])), "events[0].finished.reason"),
    ("metrics", metr("WatchJobEvents", metrics_pb2.WatchJobEventsRequest(job="jobs/" + "j" * 2000), stream=True),
     "job"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1", attempt=1,
                                                        class_names=[f"c{i}" for i in range(256)])), "class_names"),
    ("trainer", trn("RunJob", trainer_pb2.RunJobRequest(job="jobs/j-1", attempt=1, output_prefix="jobs/j-1/attempts/1/",
                                                        tile_manifest=common_pb2.Artifact(uri="x"),
                                                        node_rank=3)), "node_rank"),
    ("trainer", trn("AnalyzeTiles", trainer_pb2.AnalyzeTilesRequest(
        image_keys=[f"uploads/u/{i}.png" for i in range(1001)])), "image_keys"),
    ("trainer", trn("WatchJobRun", trainer_pb2.WatchJobRunRequest(job="jobs/../x", attempt=1), stream=True), "job"),
    ("metrics", metr("AppendJobEvents", metrics_pb2.AppendJobEventsRequest(job="jobs/j-1", events=[
        common_pb2.JobEvent(job="jobs/j-1", attempt=1, source_seq=i + 1,
                            phase_change=common_pb2.PhaseChange(phase=common_pb2.PHASE_TRAINING))
        for i in range(1001)])), "events"),
    ("metrics", metr("RenderJobCharts", metrics_pb2.RenderJobChartsRequest(jobs=["jobs/j-1"], height=5000)),
     "height"),
    ("metrics", metr("RenderJobCharts", metrics_pb2.RenderJobChartsRequest()), "jobs"),
    ("metrics", metr("ListJobEvents", metrics_pb2.ListJobEventsRequest(job="jobs/j-1", after_seq=-5)), "after_seq"),
    ("metrics", metr("GetJobHistory", metrics_pb2.GetJobHistoryRequest(job="not a job")), "job"),
]


@pytest.mark.parametrize(("service", "invoke", "field"), MALFORMED)
def test_malformed_requests_with_a_valid_token_name_the_field(secured: Secured, service: str,
                                                              invoke: Callable[..., object], field: str) -> None:
    from tests.helpers import violation_fields

    token = node_token_of("t-1") if service == "trainer" else TOKENS[Role.SERVICE]
    with pytest.raises(grpc.RpcError) as info:
        call(getattr(secured, service), token, invoke)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in violation_fields(info.value)
