"""gRPC server bootstrap shared by the services: keepalive, message limits, health checking,
reflection, authentication, admission and error mapping (services.common.gate), and a graceful
stop on SIGTERM/SIGINT.

The pipeline and metrics services serve on grpc.aio (``create_server``): a waiting watch stream
costs no thread, and blocking work runs in bounded pools. The trainer node keeps a thread-per-call
server (``create_threaded_server``): only the pipeline services call it."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients import addresses
from services.common import logs
from services.common.auth import AuthInterceptor, BearerToken, Role, TokenStore
from services.common.gate import Executors, Gate
from services.common.interceptor import ErrorMappingInterceptor
from services.common.observability import RpcMetrics, ThreadedRpcMetrics
from services.common.settings import SecuritySettings, ServerSettings, ServingSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Watch streams live for hours: ping idle connections and accept clients' pings every 10 s
# (the default refuses pings more often than every 5 minutes).
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Two servers must never silently share a port.
    ("grpc.so_reuseport", 0),
]

RECONNECT_BACKOFF_MAX_MS = 1000

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A peer that restarts is reached again within a second of coming back (gRPC's default backoff
    # grows to 120 s: a node would miss its lease after a pipeline restart of a few seconds).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

Registrar = Callable[[Any], None]  # adds a servicer to a grpc.aio.Server or grpc.Server


class AsyncServer:
    """A grpc.aio server on its own event-loop thread, driven from synchronous code (the
    services' main functions, the tests): ``start()``, ``stop(grace).wait()``, ``run(coro)``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.gate: Gate | None = None  # what it admits now (calls, streams): inspectable
        self.on_stopped: list[Callable[[], None]] = []
        self._stopped: threading.Event | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def start(self) -> None:
        assert self.server is not None
        self.run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stops accepting calls, lets in-flight ones finish for `grace` seconds, then ends the
        loop; the event is set once all of it is done."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = stopped = threading.Event()
        assert self.server is not None
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

        def finished(_: object) -> None:
            for callback in self.on_stopped:
                callback()
            self.loop.call_soon_threadsafe(self.loop.stop)
            stopped.set()
        future.add_done_callback(finished)
        return stopped

    def enter_graceful_shutdown(self) -> None:
        if self.health is not None:
            self.run(self.health.enter_graceful_shutdown())


def create_server(
    address: str,
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    *,
    access: Mapping[str, Role],
    security: SecuritySettings,
    serving: ServingSettings,
    reserved: Collection[str] = (),
    long: Collection[str] = (),
    executors: Executors | None = None,
) -> tuple[AsyncServer, int, health.aio.HealthServicer]:
    """Builds a ready-to-start asyncio server bound to `address` ("host:0" picks a free port),
    every call going through services.common.gate (authentication, admission, error mapping).

    `access` gives the minimum role of each full method name; `reserved` the methods with their
    own capacity, `long` those held to `max_long_calls`; `executors` (shut down with the server)
    those its servicers run blocking work in. Returns the server, the bound port and its health
    servicer (SERVING for every service).
    """
    loopback = _is_loopback(address)
    store = _token_store(address, security)
    handle = AsyncServer()

    handle.gate = gate = Gate(store, access, reserved, serving, long)

    async def build() -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
        pending = [("grpc.server.max_pending_requests", serving.max_pending_calls),
                   ("grpc.server.max_pending_requests_hard_limit", 2 * serving.max_pending_calls)]
        server = grpc.aio.server(interceptors=[RpcMetrics(), gate], options=[*SERVER_OPTIONS, *pending])
        for register in registrars:
            register(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in [*service_names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if serving.reflection == "on" or (serving.reflection == "auto" and loopback):
            reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        return server, _bind(server, address, security), health_servicer

    try:
        handle.server, port, handle.health = handle.run(build())
    except BaseException:
        handle.loop.call_soon_threadsafe(handle.loop.stop)
        raise
    if executors is not None:
        handle.on_stopped.append(executors.shutdown)
    return handle, port, handle.health


def create_threaded_server(
    address: str,
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    *,
    access: Mapping[str, Role],
    security: SecuritySettings,
    store: TokenStore | None,
    max_workers: int = 64,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A thread-per-call server (the trainer node's: its callers are the pipeline services, its
    streams one per running attempt), with the same transport security as ``create_server``;
    `store` holds the tokens it accepts (None: no authentication, loopback only)."""
    _check_exposure(address, security, authenticated=store is not None)
    interceptors: list[grpc.ServerInterceptor] = [ThreadedRpcMetrics()]
    if store is not None:
        interceptors.append(AuthInterceptor(store, access))
    interceptors.append(ErrorMappingInterceptor())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=SERVER_OPTIONS,
    )
    for register in registrars:
        register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*service_names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, _bind(server, address, security), health_servicer


def _token_store(address: str, security: SecuritySettings) -> TokenStore | None:
    """The tokens callers must present (and, with the node key, the node tokens); refuses to
    serve beyond loopback without them, or in plaintext unless allowed."""
    _check_exposure(address, security, authenticated=security.auth_tokens_file is not None)
    if security.auth_tokens_file is None:
        return None
    return TokenStore.load(security.auth_tokens_file, security.node_key_bytes())


def _check_exposure(address: str, security: SecuritySettings, *, authenticated: bool) -> None:
    loopback = _is_loopback(address)
    tls = security.tls_cert_file is not None and security.tls_key_file is not None
    if not authenticated and not loopback:
        raise RuntimeError(f"refusing to serve {address} without authentication: set SEGTRAIN_AUTH_TOKENS_FILE "
                           "(a trainer node: SEGTRAIN_TRAINER_TOKEN)")
    if not tls and not loopback and not security.allow_plaintext:
        raise RuntimeError(f"refusing to serve {address} in plaintext: set SEGTRAIN_TLS_CERT_FILE and "
                           "SEGTRAIN_TLS_KEY_FILE, or SEGTRAIN_ALLOW_PLAINTEXT=true on a private network")


def _bind(server: Any, address: str, security: SecuritySettings) -> int:
    if security.tls_cert_file is not None and security.tls_key_file is not None:
        credentials = grpc.ssl_server_credentials(
            [(_read(security.tls_key_file), _read(security.tls_cert_file))],
            root_certificates=_read(security.tls_ca_file) if security.tls_ca_file else None,
            require_client_auth=security.tls_client_auth,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return int(port)


def connect(address: str, security: SecuritySettings) -> grpc.Channel:
    """A channel to another service: TLS when a CA is configured (presenting this service's
    certificate for mutual TLS), carrying this service's token when one is configured."""
    token = security.service_token.get_secret_value() if security.service_token is not None else None
    return connect_as(address, security, token)


def connect_as(address: str, security: SecuritySettings, token: str | None) -> grpc.Channel:
    """A channel like ``connect``'s carrying `token` (None: none) instead of the service token:
    a trainer node's own, between that node and the pipeline service. `address` may list
    replicas (clients/addresses.py): calls go to any of them that is up."""
    target = addresses.parse(address)
    options = CHANNEL_OPTIONS + target.options
    if security.tls_ca_file is not None:
        client_pair = (_read(security.tls_key_file), _read(security.tls_cert_file)) \
            if security.tls_key_file and security.tls_cert_file else (None, None)
        credentials = grpc.ssl_channel_credentials(_read(security.tls_ca_file), *client_pair)
        channel = grpc.secure_channel(target.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target.target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


def _read(path: Path | None) -> bytes:
    assert path is not None
    return path.read_bytes()


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def serve_until_signalled(
    server: AsyncServer | grpc.Server,
    health_servicer: health.HealthServicer | None,
    grace_s: float,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Waits (the server started) until SIGTERM/SIGINT, then reports NOT_SERVING and drains
    in-flight RPCs."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: draining for up to %.0f s", grace_s)
    if isinstance(server, AsyncServer):
        server.enter_graceful_shutdown()
    elif health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    if on_stop is not None:
        on_stop()
    server.stop(grace_s).wait()


def configure_logging(settings: ServerSettings) -> None:
    """Logging as SEGTRAIN_LOG_LEVEL and SEGTRAIN_LOG_FORMAT say (services/common/logs.py)."""
    logs.configure(settings.log_level, settings.log_format)
