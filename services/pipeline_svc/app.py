"""Composition of the pipeline service: settings -> engine/store/peer stubs -> service -> servicer."""

from __future__ import annotations

from grpc_health.v1 import health
from segtrain.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc

from services.common import observability
from services.common.database import make_engine
from services.common.gate import BlockingServicer, Executors
from services.common.server import AsyncServer, create_server
from services.common.settings import PipelineSettings, SecuritySettings, ServingSettings, StorageSettings
from services.common.storage import ObjectStore
from services.pipeline_svc.resources.set_preparation import Tuning
from services.pipeline_svc.runtime.collector import Collection
from services.pipeline_svc.runtime.observed import PipelineCollector
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.service import PipelineService
from services.pipeline_svc.servicer import ACCESS, LONG, RESERVED, PipelineServicer
from services.pipeline_svc.tables import SCHEMA

SERVICE_NAME = pipeline_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name
VERSION = "0.1.0"


def build(settings: PipelineSettings, storage: StorageSettings, security: SecuritySettings | None = None,
          serving: ServingSettings | None = None
          ) -> tuple[AsyncServer, int, health.aio.HealthServicer, PipelineService]:
    security, serving = security or SecuritySettings(), serving or ServingSettings()
    if security.auth_tokens_file is not None and security.node_key is None:
        raise RuntimeError("authentication is on but SEGTRAIN_NODE_KEY is unset: no trainer node could "
                           "register (scripts/make_tokens.py makes a node key)")
    engine = make_engine(settings.database_url, SCHEMA, migrate=settings.database_migrate)
    store = ObjectStore(storage)
    store.ensure_bucket()
    service = PipelineService(
        engine, store, PeerStubs(settings.metrics_address, security),
        metrics_public_address=settings.metrics_public_address or settings.metrics_address,
        schedule_interval_s=settings.schedule_interval_s, heartbeat_interval_s=settings.heartbeat_interval_s,
        max_attempts=settings.max_attempts, prepare_concurrency=settings.prepare_concurrency,
        preparation=Tuning(threads=settings.prepare_threads, window=2 * settings.prepare_threads,
                           memory_bytes=settings.prepare_memory_mb * 2**20),
        max_active_jobs_per_principal=settings.max_active_jobs_per_principal,
        collection=Collection(interval_s=settings.collect_interval_s, upload_ttl_s=settings.upload_ttl_s,
                              orphan_grace_s=settings.orphan_grace_s),
        relay_lease_s=settings.relay_lease_s, replica=settings.replica_id,
    )
    observability.register(PipelineCollector(engine))
    # The service's work is blocking (SQL, object storage): each call runs in the bounded pools.
    executors = Executors(serving)
    servicer = BlockingServicer(PipelineServicer(service, VERSION), executors,
                                reserved={m.rsplit("/", 1)[1] for m in RESERVED})
    server, port, health_servicer = create_server(
        settings.listen, [lambda s: pipeline_pb2_grpc.add_PipelineServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], access=ACCESS, security=security, serving=serving, reserved=RESERVED, long=LONG,
        executors=executors,
    )
    return server, port, health_servicer, service
