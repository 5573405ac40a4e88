"""Composition of a trainer node: settings -> store -> analyzer, worker environment -> node -> servicer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import grpc
from grpc_health.v1 import health
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.server import connect, create_server
from services.common.settings import SecuritySettings, ServerSettings, StorageSettings, TrainerSettings, environment
from services.common.storage import ObjectStore
from services.trainer_svc.node import Analyses, AnalyzerOnDemand, Registration, TrainerNode
from services.trainer_svc.servicer import ACCESS, TrainerServicer

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def build(settings: TrainerSettings, storage: StorageSettings, security: SecuritySettings | None = None
          ) -> tuple[grpc.Server, int, health.HealthServicer, TrainerNode, Registration]:
    security = security or SecuritySettings()
    store = ObjectStore(storage)
    store.ensure_bucket()
    device = None if settings.device == "auto" else settings.device
    # Each attempt's worker reads the same settings the node was built with.
    worker_env = {**os.environ, **environment(storage, settings, ServerSettings())}
    node = TrainerNode(AnalyzerOnDemand(lambda: _analyzer(store, device, settings.num_threads)),
                       capacity=settings.capacity, worker_env=worker_env)
    servicer = TrainerServicer(node)
    server, port, health_servicer = create_server(
        settings.listen, [lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], access=ACCESS, security=security,
    )
    host = settings.listen.rsplit(":", 1)[0]
    address = settings.advertise_address or f"{host}:{port}"
    node_id = settings.node_id or _default_node_id(port)
    registration = Registration(node, settings.pipeline_address, node_id, address, lambda: _device_name(device),
                                connect(settings.pipeline_address, security))
    return server, port, health_servicer, node, registration


def _default_node_id(port: int) -> str:
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower()).strip("-")[:40]
    return f"{host or 'node'}-{port}"


def _analyzer(store: ObjectStore, device: str | None, num_threads: int | None) -> Analyses:
    from services.trainer_svc.analysis import Analyzer

    return Analyzer(store, device, num_threads)


def _device_name(device: str | None) -> str:
    """What the node trains on ("cpu", "cuda (NVIDIA H200)"), asked of torch in a short-lived
    process so that this one never loads it for that."""
    probe = ("import sys; from segcore.checkpoint import environment_info; "
             "print(environment_info(sys.argv[1] if len(sys.argv) > 1 else None)['device'])")
    result = subprocess.run([sys.executable, "-c", probe, *([device] if device else [])], capture_output=True,
                            text=True, timeout=120, check=False)
    return result.stdout.strip() or "unknown"
