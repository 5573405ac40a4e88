"""The other services, as the pipeline service calls them: the metrics service and trainer nodes,
over one cached channel per address. Channels live as long as the process (they are cheap and
in-flight calls must outlive a shutdown's drain)."""

from __future__ import annotations

import logging
import threading

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.server import connect
from services.common.settings import SecuritySettings

log = logging.getLogger(__name__)


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

    def stop_job_on(self, address: str, *, job: str, stop_early: bool) -> None:
        """Asks the node at `address` to stop `job` now; if this does not reach it, the node learns
        it at its next heartbeat (stop_jobs)."""
        try:
            self.trainer(address).CancelJobRun(trainer_pb2.CancelJobRunRequest(job=job, stop_early=stop_early),
                                               timeout=10)
        except grpc.RpcError as exc:
            log.warning("could not tell the node at %s to stop %s: %s", address, job, exc.code())

    def job_history(self, job: str) -> list[common_pb2.EpochMetrics]:
        """The job's effective epochs, from the metrics service."""
        request = metrics_pb2.GetJobHistoryRequest(job=job)
        return list(self.metrics.GetJobHistory(request, timeout=30).epochs)
