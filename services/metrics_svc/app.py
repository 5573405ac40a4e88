"""Composition of the metrics service: settings -> engine -> service -> servicer -> server."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

from services.common.database import make_engine
from services.common.server import create_server
from services.common.settings import MetricsSettings, SecuritySettings
from services.metrics_svc.service import MetricsService
from services.metrics_svc.servicer import ACCESS, MetricsServicer
from services.metrics_svc.tables import TABLES

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name


def build(settings: MetricsSettings, security: SecuritySettings | None = None
          ) -> tuple[grpc.Server, int, health.HealthServicer, MetricsService]:
    security = security or SecuritySettings()
    engine = make_engine(settings.database_url, TABLES)
    service = MetricsService(
        engine, heartbeat_interval_s=settings.heartbeat_interval_s, watcher_buffer=settings.watcher_buffer
    )
    servicer = MetricsServicer(service)
    server, port, health_servicer = create_server(
        settings.listen,
        [lambda s: metrics_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], access=ACCESS, security=security,
        max_workers=512,  # one thread per live watch stream
    )
    return server, port, health_servicer, service
