"""A trainer node that cannot tell what it offers yet (its device probe timed out on a machine
too busy to start torch: seen under the 1,000-watcher load test) keeps trying and registers once
it can, instead of serving on unregistered and unseen."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from services.trainer_svc import node as node_module
from services.trainer_svc.node import NodeOffer, Registration, TrainerNode
from tests.integration.conftest import PipelineServer


def test_a_node_whose_offer_fails_retries_until_it_registers(
        pipeline_server: PipelineServer, s3_settings: StorageSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "OFFER_RETRY_S", 0.1)
    tries: list[int] = []

    def offer() -> NodeOffer:
        tries.append(1)
        if len(tries) < 3:
            raise subprocess.TimeoutExpired(["python", "-c", "import torch"], 120)
        return NodeOffer(device="cpu", job_memory_bytes=2**30, max_processes=1)

    trainer = TrainerNode(None, ObjectStore(s3_settings), capacity=1, worker_env={})  # type: ignore[arg-type]
    channel = grpc.insecure_channel(pipeline_server.address)
    registration = Registration(trainer, pipeline_server.address, "slow-probe", "127.0.0.1:1", offer, channel)
    registration.start()
    try:
        assert registration.registered.wait(10), "the node gave up registering"
        assert len(tries) == 3 and registration.is_alive()
        listed = pipeline_server.stub.ListTrainerNodes(pb.ListTrainerNodesRequest(), timeout=10)
        assert [n.name for n in listed.trainer_nodes] == ["trainerNodes/slow-probe"]
    finally:
        registration.stopping.set()
        registration.join(5)
        channel.close()
