"""Stubs of the services the pipeline service calls: the metrics service and trainer nodes,
over one cached channel per address."""

from __future__ import annotations

import threading

import grpc
from segtrain.metrics.v1 import metrics_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2_grpc

from services.common.server import connect
from services.common.settings import SecuritySettings


class PeerStubs:
    def __init__(self, metrics_address: str, security: SecuritySettings) -> None:
        self._security = security
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self.metrics = metrics_pb2_grpc.MetricsServiceStub(self._channel(metrics_address))

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = connect(address, self._security)
            return self._channels[address]

    def trainer(self, address: str) -> trainer_pb2_grpc.TrainerServiceStub:
        return trainer_pb2_grpc.TrainerServiceStub(self._channel(address))

    def close(self) -> None:
        """Closes every channel; called once the threads that use them have stopped."""
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
