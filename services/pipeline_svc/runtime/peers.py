"""The other services, as the pipeline service calls them: the metrics service and trainer nodes,
over one cached channel per address. Channels live as long as the process (they are cheap and
in-flight calls must outlive a shutdown's drain).

The metrics service is called with the service token. A trainer node is called with that node's
own token (services/common/tokens.py), derived from the node key: an address a node registered
receives nothing its registration did not already hold, and never the service token."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.errors import CancelledError
from services.common.server import connect, connect_as
from services.common.settings import SecuritySettings
from services.common.tokens import node_token

log = logging.getLogger(__name__)


class PeerStubs:
    def __init__(self, metrics_address: str, security: SecuritySettings) -> None:
        self._security = security
        self._node_key = security.node_key_bytes()
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str | None], grpc.Channel] = {}
        self.metrics = metrics_pb2_grpc.MetricsServiceStub(self._channel(metrics_address, None))

    def _channel(self, address: str, node_id: str | None) -> grpc.Channel:
        """The channel to `address`: the service's own (node_id None) or node `node_id`'s."""
        with self._lock:
            if (address, node_id) not in self._channels:
                if node_id is None:
                    channel = connect(address, self._security)
                else:
                    token = node_token(self._node_key, node_id) if self._node_key is not None else None
                    channel = connect_as(address, self._security, token)
                self._channels[address, node_id] = channel
            return self._channels[address, node_id]

    def trainer(self, node_id: str, address: str) -> trainer_pb2_grpc.TrainerServiceStub:
        """Trainer node `node_id`, at the address it registered, called with its own token."""
        return trainer_pb2_grpc.TrainerServiceStub(self._channel(address, node_id))

    def stop_job_on(self, node_id: str, address: str, *, job: str, stop_early: bool) -> None:
        """Asks node `node_id` to stop `job` now; if this does not reach it, the node learns it at
        its next heartbeat (stop_jobs)."""
        try:
            self.trainer(node_id, address).CancelJobRun(trainer_pb2.CancelJobRunRequest(job=job, stop_early=stop_early),
                                               timeout=10)
        except grpc.RpcError as exc:
            log.warning("could not tell the node at %s to stop %s: %s", address, job, exc.code())

    def job_history(self, job: str) -> list[common_pb2.EpochMetrics]:
        """The job's effective epochs, from the metrics service."""
        request = metrics_pb2.GetJobHistoryRequest(job=job)
        return list(self.metrics.GetJobHistory(request, timeout=30).epochs)


def result_unless_abandoned(call: grpc.Future, is_active: Callable[[], bool], *, stopped: str) -> Any:  # type: ignore[type-arg]
    """The result of a call to a node; if the caller gives up first (`is_active` false), the
    node's call is cancelled, which stops its work, and CANCELLED says `stopped`."""
    while True:
        try:
            return call.result(timeout=0.25)
        except grpc.FutureTimeoutError:
            if not is_active():
                call.cancel()
                raise CancelledError(f"the caller gave up: {stopped}") from None
