"""Composition of the metrics service: settings -> engine -> service -> servicer -> server."""

from __future__ import annotations

import threading

from grpc_health.v1 import health
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

from services.common import observability
from services.common.database import make_engine
from services.common.gate import Executors
from services.common.server import AsyncServer, create_server
from services.common.settings import MetricsSettings, SecuritySettings, ServingSettings
from services.metrics_svc.observed import WatchCollector
from services.metrics_svc.retention import Retention, RetentionThread
from services.metrics_svc.service import MetricsService
from services.metrics_svc.servicer import ACCESS, RESERVED, MetricsServicer
from services.metrics_svc.tables import SCHEMA

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name


def build(settings: MetricsSettings, security: SecuritySettings | None = None,
          serving: ServingSettings | None = None) -> tuple[AsyncServer, int, health.aio.HealthServicer, MetricsService]:
    security, serving = security or SecuritySettings(), serving or ServingSettings()
    engine = make_engine(settings.database_url, SCHEMA, migrate=settings.database_migrate)
    executors = Executors(serving)
    service = MetricsService(engine, executors, heartbeat_interval_s=settings.heartbeat_interval_s,
                             watcher_buffer=settings.watcher_buffer, unknown_job_grace_s=settings.unknown_job_grace_s,
                             poll_interval_s=settings.poll_interval_s)
    servicer = MetricsServicer(service)
    observability.register(WatchCollector(service.hub))
    server, port, health_servicer = create_server(
        settings.listen,
        [lambda s: metrics_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], access=ACCESS, security=security, serving=serving, reserved=RESERVED, executors=executors,
    )
    # Event-log retention runs as long as the server does.
    stopping = threading.Event()
    RetentionThread(engine, Retention(days=settings.retention_days, max_events_per_job=settings.max_events_per_job,
                                      interval_s=settings.retention_interval_s), stopping).start()
    server.on_stopped.append(stopping.set)
    return server, port, health_servicer, service
