"""Composition of a trainer node: settings -> store -> analyzer, worker environment -> node -> servicer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import grpc
from grpc_health.v1 import health
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common import observability
from services.common.auth import TokenStore
from services.common.server import connect_as, create_threaded_server
from services.common.settings import SecuritySettings, ServerSettings, StorageSettings, TrainerSettings, environment
from services.common.storage import ObjectStore
from services.trainer_svc.node import Analyses, AnalyzerOnDemand, NodeOffer, Registration, TrainerNode
from services.trainer_svc.observed import TrainerCollector
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
    node = TrainerNode(AnalyzerOnDemand(lambda: _analyzer(store, device, settings.num_threads)), store,
                       capacity=settings.capacity, worker_env=worker_env)
    servicer = TrainerServicer(node)
    observability.register(TrainerCollector(node.runs))
    # The node's own token both ways: it registers with it, and accepts only calls carrying it.
    token = settings.token.get_secret_value() if settings.token is not None else None
    server, port, health_servicer = create_threaded_server(
        settings.listen, [lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], access=ACCESS, security=security, store=TokenStore.of_node(token) if token else None,
    )
    host = settings.listen.rsplit(":", 1)[0]
    address = settings.advertise_address or f"{host}:{port}"
    node.rendezvous_host = address.rsplit(":", 1)[0]
    node_id = settings.node_id or _default_node_id(port)
    registration = Registration(node, settings.pipeline_address, node_id, address,
                                lambda: _offer(settings, _device_facts(device)),
                                connect_as(settings.pipeline_address, security, token))
    return server, port, health_servicer, node, registration


def _default_node_id(port: int) -> str:
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower()).strip("-")[:40]
    return f"{host or 'node'}-{port}"


def _analyzer(store: ObjectStore, device: str | None, num_threads: int | None) -> Analyses:
    from services.trainer_svc.analysis import Analyzer

    return Analyzer(store, device, num_threads)


def _device_facts(device: str | None) -> dict[str, Any]:
    """What the node trains on ("cpu", "cuda (NVIDIA H200)"), its GPUs and their memory, asked of
    torch in a short-lived process so that this one never loads it for that."""
    probe = ("import json, sys, torch; from segcore.checkpoint import environment_info; "
             "d = sys.argv[1] if len(sys.argv) > 1 else None; "
             "cuda = torch.cuda.is_available() and (d is None or d.startswith('cuda')); "
             "print(json.dumps({'device': environment_info(d)['device'], "
             "'gpus': torch.cuda.device_count() if cuda else 0, "
             "'gpu_memory': torch.cuda.get_device_properties(0).total_memory if cuda else 0}))")
    # Importing torch takes seconds, or minutes on a busy machine (4 probes beside 1,000 watchers on
    # 2 cores took over 120 s): a generous limit, and the registration retries after it.
    result = subprocess.run([sys.executable, "-c", probe, *([device] if device else [])], capture_output=True,
                            text=True, timeout=600, check=False)
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"device": "unknown", "gpus": 0, "gpu_memory": 0}


# The node's own processes per job besides the training processes: the launcher, and each data
# loader process (both import torch), in resident memory.
_LAUNCHER_BYTES, _LOADER_BYTES = 600 * 2**20, 500 * 2**20


def _offer(settings: TrainerSettings, facts: dict[str, Any]) -> NodeOffer:
    """What one job may use here (admission): on CUDA one GPU's memory per process and the GPUs;
    on CPU the host's memory divided by capacity, less the node's own processes per job, and its
    cores."""
    gpus = int(facts.get("gpus") or 0)
    if settings.job_memory_mb:
        memory = settings.job_memory_mb * 2**20
    elif gpus:
        memory = int(facts.get("gpu_memory") or 0)
    else:
        per_job = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, settings.capacity)
        memory = max(0, per_job - _LAUNCHER_BYTES - settings.data_workers * _LOADER_BYTES)
    return NodeOffer(device=str(facts.get("device") or "unknown"), job_memory_bytes=memory,
                     max_processes=gpus or os.cpu_count() or 1)
