"""The asyncio servers under hostile and careless clients, through real gRPC on loopback: nothing an
unauthenticated or viewer caller opens starves the others, a full server says so at once, the
reserved methods keep their capacity, abandoned calls stop their work, and nothing leaks after the
clients leave. Every loop here is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc

from services.common.auth import Role, write_tokens_file
from services.common.gate import BlockingServicer, CallState, Executors
from services.common.server import AsyncServer, create_server
from services.common.settings import (
    MetricsSettings,
    PipelineSettings,
    SecuritySettings,
    ServingSettings,
    StorageSettings,
)
from services.common.tokens import LISTED_ROLES
from services.metrics_svc import app as metrics_app
from services.pipeline_svc import app as pipeline_app
from services.pipeline_svc.servicer import ACCESS, LONG, RESERVED
from tests.helpers import NODE_KEY, node_token_of

TOKENS = {role: f"token-{role.name.lower()}-0123456789" for role in LISTED_ROLES} | {Role.NODE: node_token_of("n-1")}


def bearer(role: Role) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[role]}")]


@pytest.fixture
def security(tmp_path: Path) -> SecuritySettings:
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {token: (f"user-{role.name.lower()}", role) for role, token in TOKENS.items()
                                    if role is not Role.NODE}
                      | {"token-second-viewer-0123456789": ("another-viewer", Role.VIEWER)})
    return SecuritySettings(auth_tokens_file=tokens_file, service_token=SecretStr(TOKENS[Role.SERVICE]),
                            node_key=SecretStr(NODE_KEY))


# ----------------------------------------------------------- the gate, on a servicer we control


class Held(pipeline_pb2_grpc.PipelineServiceServicer):
    """A pipeline servicer whose ListPipelines blocks until released (or until its call is
    abandoned), and whose heartbeat answers at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.stopped_by_cancel = 0
        self._lock = threading.Lock()

    def AnalyzeTiles(self, request: object, state: CallState) -> pipeline_pb2.AnalyzeTilesResponse:
        self.ListPipelines(request, state)
        return pipeline_pb2.AnalyzeTilesResponse()

    def ListPipelines(self, request: object, state: CallState) -> pipeline_pb2.ListPipelinesResponse:
        with self._lock:
            self.running += 1
        try:
            for _ in range(600):  # at most 30 s
                if self.release.wait(0.05):
                    return pipeline_pb2.ListPipelinesResponse()
                if not state.is_active():
                    with self._lock:
                        self.stopped_by_cancel += 1
                    raise TimeoutError("abandoned")  # what blocking code does when told to stop
            return pipeline_pb2.ListPipelinesResponse()
        finally:
            with self._lock:
                self.running -= 1

    def HeartbeatTrainerNode(self, request: object, state: CallState) -> pipeline_pb2.HeartbeatTrainerNodeResponse:
        return pipeline_pb2.HeartbeatTrainerNodeResponse(registered=True)


@dataclass
class Gated:
    server: AsyncServer
    address: str
    servicer: Held


@pytest.fixture
def gated(security: SecuritySettings) -> Iterator[Gated]:
    serving = ServingSettings(max_calls=4, reserved_calls=2, max_long_calls=2, blocking_threads=4, reserved_threads=1,
                              max_streams_per_principal=3, max_open_streams_per_peer=5)
    executors = Executors(serving)
    held = Held()
    blocking = BlockingServicer(held, executors, reserved={"HeartbeatTrainerNode"})
    server, port, _ = create_server(
        "127.0.0.1:0", [lambda s: pipeline_pb2_grpc.add_PipelineServiceServicer_to_server(blocking, s)],
        ["segtrain.pipeline.v1.PipelineService"], access=ACCESS, security=security, serving=serving,
        reserved=RESERVED, long=LONG, executors=executors)
    server.start()
    try:
        yield Gated(server, f"127.0.0.1:{port}", held)
    finally:
        held.release.set()
        server.stop(0).wait()


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_full_server_refuses_at_once_and_keeps_the_reserved_capacity(gated: Gated) -> None:
    with grpc.insecure_channel(gated.address) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        pending = [stub.ListPipelines.future(pipeline_pb2.ListPipelinesRequest(), metadata=bearer(Role.VIEWER),
                                             timeout=30) for _ in range(4)]
        wait_until(lambda: gated.servicer.running == 4)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListPipelines(pipeline_pb2.ListPipelinesRequest(), metadata=bearer(Role.ADMIN), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1.0  # at once, not after a queue
        # Node heartbeats have capacity of their own that user calls cannot take.
        beat = stub.HeartbeatTrainerNode(pipeline_pb2.HeartbeatTrainerNodeRequest(name="trainerNodes/n"),
                                         metadata=bearer(Role.NODE), timeout=5)
        assert beat.registered
        gated.servicer.release.set()
        assert all(f.result(timeout=10) is not None for f in pending)
    wait_until(lambda: gated.server.gate.admission.calls == 0)  # type: ignore[union-attr]


def test_long_calls_hold_only_their_share_and_short_calls_keep_the_rest(gated: Gated) -> None:
    with grpc.insecure_channel(gated.address) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        analyses = [stub.AnalyzeTiles.future(pipeline_pb2.AnalyzeTilesRequest(), metadata=bearer(Role.TRAINER),
                                             timeout=30) for _ in range(2)]
        wait_until(lambda: gated.servicer.running == 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.AnalyzeTiles(pipeline_pb2.AnalyzeTilesRequest(), metadata=bearer(Role.TRAINER), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "long calls" in refused.value.details()
        assert time.monotonic() - started < 1.0
        # The other half of the capacity is the short calls': two of them run beside the long ones.
        short = [stub.ListPipelines.future(pipeline_pb2.ListPipelinesRequest(), metadata=bearer(Role.VIEWER),
                                           timeout=30) for _ in range(2)]
        wait_until(lambda: gated.servicer.running == 4)
        gated.servicer.release.set()
        assert all(f.result(timeout=10) is not None for f in analyses + short)
    wait_until(lambda: gated.server.gate.admission.calls == 0 and gated.server.gate.admission.long == 0)  # type: ignore[union-attr]


def test_an_abandoned_call_stops_its_work_and_holds_its_capacity_until_it_has(gated: Gated) -> None:
    with grpc.insecure_channel(gated.address) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        request = pipeline_pb2.ListPipelinesRequest()
        # Two calls whose clients give up, two whose deadline passes.
        cancelled = [stub.ListPipelines.future(request, metadata=bearer(Role.VIEWER), timeout=30) for _ in range(2)]
        expiring = [stub.ListPipelines.future(request, metadata=bearer(Role.VIEWER), timeout=0.5) for _ in range(2)]
        wait_until(lambda: gated.servicer.running == 4)
        for call in cancelled:
            call.cancel()
        wait_until(lambda: gated.servicer.stopped_by_cancel == 4 and gated.servicer.running == 0)
        for call in expiring:
            with pytest.raises(grpc.RpcError):  # DEADLINE_EXCEEDED, whichever side saw it first
                call.result(timeout=10)
    wait_until(lambda: gated.server.gate.admission.calls == 0)  # type: ignore[union-attr]


def test_streams_are_capped_per_principal_and_open_ones_per_client_host(gated: Gated) -> None:
    with grpc.insecure_channel(gated.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # Health Watch needs no token: a client host may hold 5 open, the 6th is refused.
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(6)]
        codes = []
        for watch in watches:
            try:
                codes.append(next(watch).status)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes.count(health_pb2.HealthCheckResponse.SERVING) == 5
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1
        assert gated.server.gate.admission.streams["peer:127.0.0.1"] == 5  # type: ignore[union-attr]
        # Unary calls are untouched by any number of open streams.
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        for watch in watches:
            watch.cancel()
    wait_until(lambda: not gated.server.gate.admission.streams)  # type: ignore[union-attr]


# ----------------------------------------------------------- the real services under attack


@dataclass
class Stack:
    pipeline: AsyncServer
    metrics: AsyncServer
    pipeline_address: str
    metrics_address: str


@pytest.fixture
def stack(tmp_path: Path, s3_settings: StorageSettings, security: SecuritySettings) -> Iterator[Stack]:
    metrics, m_port, _, _ = metrics_app.build(
        MetricsSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'm.db'}", unknown_job_grace_s=0.5),
        security, ServingSettings(max_streams_per_principal=1000))
    metrics.start()
    pipeline, p_port, _, service = pipeline_app.build(
        PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'p.db'}",
                         metrics_address=f"127.0.0.1:{m_port}"), s3_settings, security)
    service.start()
    pipeline.start()
    try:
        yield Stack(pipeline, metrics, f"127.0.0.1:{p_port}", f"127.0.0.1:{m_port}")
    finally:
        service.stop()
        pipeline.stop(0).wait()
        metrics.stop(0).wait()


def test_watching_a_job_that_does_not_exist_is_not_found(stack: Stack) -> None:
    with grpc.insecure_channel(stack.metrics_address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            next(stub.WatchJobEvents(metrics_pb2.WatchJobEventsRequest(job="jobs/j-nope"),
                                     metadata=bearer(Role.VIEWER), timeout=10))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "jobs/j-nope" in missing.value.details()


def test_idle_open_streams_and_unknown_watches_starve_no_one(stack: Stack) -> None:
    pipeline_channel = grpc.insecure_channel(stack.pipeline_address)
    metrics_channel = grpc.insecure_channel(stack.metrics_address)
    pipeline = pipeline_pb2_grpc.PipelineServiceStub(pipeline_channel)
    metrics = metrics_pb2_grpc.MetricsServiceStub(metrics_channel)
    node = pipeline_pb2.RegisterTrainerNodeRequest(node_id="n-1", address="127.0.0.1:1", capacity=1)
    pipeline.RegisterTrainerNode(node, metadata=bearer(Role.NODE), timeout=10)
    for _ in range(20):  # warm the bounded pools up to their working size before the baseline
        pipeline.ListPipelines(pipeline_pb2.ListPipelinesRequest(), metadata=bearer(Role.VIEWER), timeout=5)
    baseline = other_threads(), tasks(stack.pipeline), tasks(stack.metrics)
    channels = [grpc.insecure_channel(a) for a in (stack.pipeline_address, stack.metrics_address) for _ in range(4)]
    try:
        # 256 unauthenticated Health Watch streams (the per-host cap refuses most of them) ...
        health_watches = [health_pb2_grpc.HealthStub(channels[i % len(channels)]).Watch(
            health_pb2.HealthCheckRequest(), timeout=60) for i in range(256)]
        # ... and 600 viewer watches of jobs that do not exist, all open at once.
        metrics_channels = channels[4:]
        unknown = [metrics_pb2_grpc.MetricsServiceStub(metrics_channels[i % 4]).WatchJobEvents(
            metrics_pb2.WatchJobEventsRequest(job=f"jobs/j-none-{i}"), metadata=bearer(Role.VIEWER), timeout=60)
            for i in range(600)]
        for round_ in range(1, 6):
            append = metrics_pb2.AppendJobEventsRequest(job="jobs/j-real", events=[common_pb2.JobEvent(
                attempt=1, source_seq=round_, warning=common_pb2.Warning(code="X"))])
            for name, stub, request, role in (
                ("ListPipelines", pipeline, pipeline_pb2.ListPipelinesRequest(), Role.VIEWER),
                ("HeartbeatTrainerNode", pipeline, pipeline_pb2.HeartbeatTrainerNodeRequest(name="trainerNodes/n-1"),
                 Role.NODE),
                ("AppendJobEvents", metrics, append, Role.SERVICE),
            ):
                started = time.monotonic()
                getattr(stub, name)(request, metadata=bearer(role), timeout=5)
                assert time.monotonic() - started < 1.0, f"{name} took {time.monotonic() - started:.2f} s"
        assert pipeline.HeartbeatTrainerNode(pipeline_pb2.HeartbeatTrainerNodeRequest(name="trainerNodes/n-1"),
                                             metadata=bearer(Role.NODE), timeout=5).registered
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(_first_or_code, unknown))
        assert outcomes.count(grpc.StatusCode.NOT_FOUND) == 600
        opened = [_first_or_code(w) for w in health_watches]
        # 32 per client host on each of the two servers; the rest refused, none left waiting.
        assert opened.count(health_pb2.HealthCheckResponse.SERVING) == 2 * 32
        assert opened.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 256 - 2 * 32
        for watch in health_watches:
            watch.cancel()
    finally:
        for channel in channels:
            channel.close()
    for server in (stack.pipeline, stack.metrics):
        wait_until(lambda s=server: not s.gate.admission.streams and s.gate.admission.calls == 0)  # type: ignore[misc]
    # Nothing leaks: the threads and the servers' asyncio tasks are back where they were.
    now = lambda: (other_threads(), tasks(stack.pipeline), tasks(stack.metrics))  # noqa: E731
    try:
        wait_until(lambda: all(n <= b for n, b in zip(now(), baseline, strict=True)), timeout=20)
    except AssertionError:
        raise AssertionError(f"threads and tasks {now()} did not return to {baseline}") from None
    pipeline_channel.close()
    metrics_channel.close()


def other_threads() -> int:
    """Threads besides the bounded pools' (which keep their threads, never more than configured)."""
    pooled = [t for t in threading.enumerate() if t.name.startswith(("blocking_", "reserved_"))]
    serving = ServingSettings()
    assert len(pooled) <= 2 * (serving.blocking_threads + serving.reserved_threads)
    return threading.active_count() - len(pooled)


def tasks(server: AsyncServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # less this one
    return server.run(count())


def _first_or_code(stream: object) -> object:
    try:
        return next(stream).status  # type: ignore[call-overload,attr-defined]
    except grpc.RpcError as exc:
        return exc.code()


def test_reflection_is_served_on_loopback_and_off_elsewhere_by_default(tmp_path: Path,
                                                                      security: SecuritySettings) -> None:
    open_security = security.model_copy(update={"allow_plaintext": True})
    for listen, expected in (("127.0.0.1:0", True), ("0.0.0.0:0", False)):
        server, port, _ = create_server(listen, [], ["segtrain.pipeline.v1.PipelineService"], access={},
                                        security=open_security, serving=ServingSettings())
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                try:
                    answer = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
                    served = bool(answer.list_services_response.service)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
                    served = False
            assert served == expected, listen
        finally:
            server.stop(0).wait()


BURST = 1500


@pytest.mark.parametrize("max_pending_calls", [8, ServingSettings().max_pending_calls])
def test_a_burst_of_watches_reaches_the_service_unless_it_outruns_the_pending_call_cap(
        tmp_path: Path, security: SecuritySettings, max_pending_calls: int) -> None:
    """BURST watches opened at once: gRPC holds the ones the event loop has not taken yet up to
    SEGTRAIN_MAX_PENDING_CALLS and cancels the rest before the service sees them; the default
    holds them all. (gRPC's own cap, 1000, cancelled some of this burst in a trial run, and a tenth
    of a burst of 2,000 in bench/watchers.py.)"""
    metrics, port, _, _ = metrics_app.build(
        MetricsSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'm.db'}"), security,
        ServingSettings(max_streams_per_principal=1000, max_pending_calls=max_pending_calls))
    metrics.start()
    job = "jobs/j-burst"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        metrics_pb2_grpc.MetricsServiceStub(channel).AppendJobEvents(metrics_pb2.AppendJobEventsRequest(
            job=job, events=[common_pb2.JobEvent(attempt=0, source_seq=1, state_change=common_pb2.StateChange(
                state=common_pb2.JOB_STATE_SUCCEEDED))]), metadata=bearer(Role.SERVICE), timeout=10)

    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as aio_channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(aio_channel)

            async def watch() -> str:
                try:
                    events = [r async for r in stub.WatchJobEvents(
                        metrics_pb2.WatchJobEventsRequest(job=job), metadata=bearer(Role.VIEWER), timeout=60)
                        if r.HasField("event")]
                    return "whole" if [r.event.seq for r in events] == [1] else "partial"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
            return await asyncio.gather(*(watch() for _ in range(BURST)))

    try:
        outcomes = asyncio.run(burst())
    finally:
        metrics.stop(0).wait()
    if max_pending_calls == 8:
        assert outcomes.count("CANCELLED") > 0 and set(outcomes) <= {"whole", "CANCELLED"}, set(outcomes)
    else:
        assert outcomes == ["whole"] * BURST, sorted(set(outcomes))
