"""In-process servers on port 0 for integration tests, talking over real gRPC channels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from segtrain.metrics.v1 import metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.pipeline.v1 import pipeline_pb2_grpc

from clients.sdk import Client
from services.common.settings import MetricsSettings, PipelineSettings, SecuritySettings, StorageSettings
from services.metrics_svc import app as metrics_app
from services.metrics_svc.service import MetricsService
from services.pipeline_svc import app as pipeline_app
from services.pipeline_svc.service import PipelineService
from tests.helpers import write_sample_set
from tests.integration.fake_node import RefusingNode, registered_node


@dataclass
class Running:
    address: str
    channel: grpc.Channel


@dataclass
class MetricsServer(Running):
    service: MetricsService
    stub: metrics_pb2_grpc.MetricsServiceStub


@dataclass
class PipelineServer(Running):
    service: PipelineService
    stub: pipeline_pb2_grpc.PipelineServiceStub
    database_url: str


def start_metrics(database_url: str, *, heartbeat_s: float = 0.2, buffer: int = 1000
                  ) -> tuple[grpc.Server, MetricsServer]:
    settings = MetricsSettings(listen="127.0.0.1:0", database_url=database_url, heartbeat_interval_s=heartbeat_s,
                               watcher_buffer=buffer)
    server, port, _, service = metrics_app.build(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, MetricsServer(f"127.0.0.1:{port}", channel, service, metrics_pb2_grpc.MetricsServiceStub(channel))


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[MetricsServer]:
    server, running = start_metrics(f"sqlite:///{tmp_path / 'metrics.db'}")
    try:
        yield running
    finally:
        running.channel.close()
        server.stop(0).wait()


@pytest.fixture
def client(pipeline_server: PipelineServer) -> Client:
    """An SDK client of the in-process pipeline service."""
    return Client(pipeline_server.address)


@pytest.fixture
def training_set(client: Client, tmp_path: Path) -> pb.TrainingSet:
    """Twelve synthetic 3-class tiles, split by source image."""
    tiles, masks = write_sample_set(tmp_path / "set", count=12)
    return client.create_training_set("cells", tiles, masks, class_names=["background", "nucleus", "debris"],
                                      group_by=r"^(.*)_tile")


@pytest.fixture
def node(pipeline_server: PipelineServer) -> Iterator[RefusingNode]:
    """A trainer node the test controls (tests/integration/fake_node.py), registered."""
    with registered_node(pipeline_server.stub) as fake:
        yield fake


@pytest.fixture
def pipeline_server(tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer
                    ) -> Iterator[PipelineServer]:
    with serving_pipeline(tmp_path, s3_settings, metrics_server) as running:
        yield running


@contextlib.contextmanager
def serving_pipeline(tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer,
                     security: SecuritySettings | None = None, **settings: Any) -> Iterator[PipelineServer]:
    """A started pipeline service on port 0 (its scheduler fast), with `security` and `settings`."""
    url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    settings = {"schedule_interval_s": 0.2, "heartbeat_interval_s": 1.0, **settings}
    server, port, _, service = pipeline_app.build(
        PipelineSettings(listen="127.0.0.1:0", database_url=url, metrics_address=metrics_server.address, **settings),
        s3_settings, security)
    service.start()
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield PipelineServer(f"127.0.0.1:{port}", channel, service,
                             pipeline_pb2_grpc.PipelineServiceStub(channel), url)
    finally:
        channel.close()
        service.stop()
        server.stop(0).wait()
