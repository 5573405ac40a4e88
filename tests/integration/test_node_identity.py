"""Trainer nodes have identities of their own: a node token is bound to one node id, registers
and heartbeats only that node, and is good for nothing else; the pipeline service calls each node
with that node's own token, so an address a node registers never receives the service token.
Everything through real gRPC, against a pipeline service with authentication on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from clients.sdk import Client
from services.common.auth import bearer_token
from services.common.settings import PipelineSettings, SecuritySettings, StorageSettings
from services.common.tokens import LISTED_ROLES, Role, write_tokens_file
from services.pipeline_svc import app as pipeline_app
from tests.helpers import NODE_KEY, error_of, node_token_of, row_counts
from tests.integration.conftest import MetricsServer, PipelineServer, serving_pipeline

S = common_pb2
TOKENS = {role: f"token-{role.name.lower()}-0123456789" for role in LISTED_ROLES}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def pipeline_server(tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer
                    ) -> Iterator[PipelineServer]:
    """The pipeline service with authentication on and the node key (overrides conftest's)."""
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {token: (f"user-{role.name.lower()}", role) for role, token in TOKENS.items()})
    security = SecuritySettings(auth_tokens_file=tokens_file, service_token=SecretStr(TOKENS[Role.SERVICE]),
                                node_key=SecretStr(NODE_KEY))
    with serving_pipeline(tmp_path, s3_settings, metrics_server, security) as running:
        yield running


@pytest.fixture
def client(pipeline_server: PipelineServer) -> Client:
    return Client(pipeline_server.address, token=TOKENS[Role.TRAINER])


class RecordingNode(trainer_pb2_grpc.TrainerServiceServicer):
    """Accepts every job, streams nothing, and records the bearer token of every call."""

    def __init__(self) -> None:
        self.tokens: list[tuple[str, str]] = []  # (method, token)
        self.accepted: list[str] = []

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        self.tokens.append((method, bearer_token(context.invocation_metadata())))

    def RunJob(self, request: trainer_pb2.RunJobRequest, context: grpc.ServicerContext) -> trainer_pb2.RunJobResponse:
        self._record("RunJob", context)
        self.accepted.append(request.job)
        return trainer_pb2.RunJobResponse()

    def WatchJobRun(self, request: trainer_pb2.WatchJobRunRequest, context: grpc.ServicerContext
                    ) -> Iterator[trainer_pb2.WatchJobRunResponse]:
        self._record("WatchJobRun", context)
        while context.is_active():
            time.sleep(0.05)
        yield from ()

    def CancelJobRun(self, request: trainer_pb2.CancelJobRunRequest, context: grpc.ServicerContext
                     ) -> trainer_pb2.CancelJobRunResponse:
        self._record("CancelJobRun", context)
        return trainer_pb2.CancelJobRunResponse(found=True)


@pytest.fixture
def recording_node() -> Iterator[tuple[RecordingNode, str]]:
    fake = RecordingNode()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def registration(node_id: str, address: str = "127.0.0.1:1") -> pb.RegisterTrainerNodeRequest:
    return pb.RegisterTrainerNodeRequest(node_id=node_id, address=address, capacity=1, device="cpu",
                                         job_memory_bytes=64 * 2**30, max_processes=1)


def test_a_node_token_registers_and_heartbeats_its_own_node_only(pipeline_server: PipelineServer) -> None:
    stub = pipeline_server.stub
    stub.RegisterTrainerNode(registration("node-a", "127.0.0.1:7001"), metadata=bearer(node_token_of("node-a")),
                             timeout=10)
    rows = row_counts(pipeline_server.database_url, ["trainer_nodes"])
    # Node b's token can neither take node a's id (to redirect its work) nor renew it.
    hijack = error_of(stub.RegisterTrainerNode, registration("node-a", "127.0.0.1:6666"),
                      metadata=bearer(node_token_of("node-b")), timeout=10)
    assert hijack.code() == grpc.StatusCode.PERMISSION_DENIED and "node-a" in hijack.details()
    beat = error_of(stub.HeartbeatTrainerNode, pb.HeartbeatTrainerNodeRequest(name="trainerNodes/node-a"),
                    metadata=bearer(node_token_of("node-b")), timeout=10)
    assert beat.code() == grpc.StatusCode.PERMISSION_DENIED
    # No other role may register or heartbeat a node, an admin's and the services' own included.
    for role in (Role.ADMIN, Role.SERVICE):
        refused = error_of(stub.RegisterTrainerNode, registration("node-a", "127.0.0.1:6666"),
                           metadata=bearer(TOKENS[role]), timeout=10)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "trainer node's own token" in refused.details()
    # A node token made with another key, or altered, is no token at all.
    forged = node_token_of("node-a")[:-4] + "0000"
    assert error_of(stub.RegisterTrainerNode, registration("node-a"), metadata=bearer(forged),
                    timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
    # A node token is good for nothing else.
    assert error_of(stub.ListPipelines, pb.ListPipelinesRequest(), metadata=bearer(node_token_of("node-a")),
                    timeout=10).code() == grpc.StatusCode.PERMISSION_DENIED
    assert row_counts(pipeline_server.database_url, ["trainer_nodes"]) == rows
    node = stub.ListTrainerNodes(pb.ListTrainerNodesRequest(), metadata=bearer(TOKENS[Role.ADMIN]),
                                 timeout=10).trainer_nodes
    assert [(n.name, n.address) for n in node] == [("trainerNodes/node-a", "127.0.0.1:7001")]
    renewed = stub.HeartbeatTrainerNode(pb.HeartbeatTrainerNodeRequest(name="trainerNodes/node-a"),
                                        metadata=bearer(node_token_of("node-a")), timeout=10)
    assert renewed.registered


def test_the_pipeline_calls_a_node_with_that_nodes_token_never_the_service_token(
        pipeline_server: PipelineServer, client: Client, training_set: pb.TrainingSet,
        recording_node: tuple[RecordingNode, str]) -> None:
    fake, address = recording_node
    token = node_token_of("node-a")
    stub = pipeline_server.stub
    stub.RegisterTrainerNode(registration("node-a", address), metadata=bearer(token), timeout=10)
    stopping = threading.Event()

    def heartbeat() -> None:
        while not stopping.wait(0.3):
            stub.HeartbeatTrainerNode(pb.HeartbeatTrainerNodeRequest(name="trainerNodes/node-a",
                                                                     jobs=list(fake.accepted)),
                                      metadata=bearer(token), timeout=10)
    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        job = client.create_job(pipeline="segmentation", training_set=training_set.name,
                                hyperparameters=S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1))
        client.start_job(job.name)
        deadline = time.monotonic() + 20
        while {"RunJob", "WatchJobRun"} - {method for method, _ in fake.tokens}:
            assert time.monotonic() < deadline, fake.tokens
            time.sleep(0.1)
        client.cancel_job(job.name)
        while "CancelJobRun" not in {method for method, _ in fake.tokens}:
            assert time.monotonic() < deadline, fake.tokens
            time.sleep(0.1)
    finally:
        stopping.set()
        beating.join(5)
    assert {t for _, t in fake.tokens} == {token}, "every call carries the node's own token"
    assert all(t != TOKENS[Role.SERVICE] for _, t in fake.tokens)


def test_a_pipeline_with_authentication_needs_the_node_key(tmp_path: Path, s3_settings: StorageSettings) -> None:
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {})
    with pytest.raises(RuntimeError, match="SEGTRAIN_NODE_KEY"):
        pipeline_app.build(PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'p.db'}"),
                           s3_settings, SecuritySettings(auth_tokens_file=tokens_file))
