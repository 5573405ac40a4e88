"""A trainer node the tests control, served over real gRPC on port 0: it refuses RunJob of the
jobs in `refuse` with their code, accepts the others, streams what `stream` says for each job's
attempt (then nothing until the stream is cancelled), and heartbeats what it accepted."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.pipeline.v1 import pipeline_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from clients.sdk import Client


class RefusingNode(trainer_pb2_grpc.TrainerServiceServicer):
    """Refuses RunJob of the jobs in `refuse` with their code, accepts the others (and then
    streams nothing until the stream is cancelled); heartbeats what it accepted."""

    def __init__(self) -> None:
        self.refuse: dict[str, grpc.StatusCode] = {}
        # What WatchJobRun streams for a job (given its attempt), before it waits.
        self.stream: dict[str, Callable[[int], list[common_pb2.JobEvent]]] = {}
        self.asked: list[str] = []
        self.accepted: list[str] = []
        self.requests: dict[str, trainer_pb2.RunJobRequest] = {}  # the last RunJob of each job

    def RunJob(self, request: trainer_pb2.RunJobRequest, context: grpc.ServicerContext
               ) -> trainer_pb2.RunJobResponse:
        self.asked.append(request.job)
        self.requests[request.job] = request
        code = self.refuse.get(request.job)
        if code is not None:
            context.abort(code, "refused by the test")
        self.accepted.append(request.job)
        return trainer_pb2.RunJobResponse()

    def WatchJobRun(self, request: trainer_pb2.WatchJobRunRequest, context: grpc.ServicerContext
                    ) -> Iterator[trainer_pb2.WatchJobRunResponse]:
        events = self.stream.get(request.job, lambda attempt: [])(request.attempt)
        for event in events[request.after_source_seq:]:
            yield trainer_pb2.WatchJobRunResponse(event=event)
        while context.is_active():
            time.sleep(0.05)


@contextlib.contextmanager
def registered_node(stub: pipeline_pb2_grpc.PipelineServiceStub) -> Iterator[RefusingNode]:
    """A RefusingNode, registered with the pipeline service behind `stub` and heartbeating."""
    fake = RefusingNode()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stub.RegisterTrainerNode(pb.RegisterTrainerNodeRequest(
        node_id="refusing", address=f"127.0.0.1:{port}", capacity=1, device="cpu", job_memory_bytes=64 * 2**30,
        max_processes=1), timeout=10)
    stopping = threading.Event()

    def heartbeat() -> None:
        while not stopping.wait(0.3):
            stub.HeartbeatTrainerNode(pb.HeartbeatTrainerNodeRequest(
                name="trainerNodes/refusing", jobs=list(fake.accepted)), timeout=10)
    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        yield fake
    finally:
        stopping.set()
        beating.join(5)
        server.stop(0).wait()


def wait_for_job(client: Client, name: str, states: set[int], timeout: float = 20) -> pb.Job:
    """The job once it is in one of `states` (an assertion error after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while (job := client.get_job(name)).state not in states:
        assert time.monotonic() < deadline, f"{name} still {common_pb2.JobState.Name(job.state)}"
        time.sleep(0.1)
    return job
