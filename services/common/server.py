"""gRPC server bootstrap shared by the services: keepalive, message limits, health checking,
reflection, the error interceptor, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import AuthInterceptor, BearerToken, Role, TokenStore
from services.common.interceptor import ErrorMappingInterceptor
from services.common.settings import SecuritySettings

log = logging.getLogger(__name__)

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

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

Registrar = Callable[[grpc.Server], None]


def create_server(
    address: str,
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    *,
    access: Mapping[str, Role],
    security: SecuritySettings,
    max_workers: int = 64,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds a ready-to-start server bound to `address` ("host:0" picks a free port).

    `access` gives the minimum role of each full method name. Returns the server, the bound port
    and its health servicer (SERVING for every service).
    """
    loopback = _is_loopback(address)
    interceptors: list[grpc.ServerInterceptor] = []
    if security.auth_tokens_file is not None:
        interceptors.append(AuthInterceptor(TokenStore.load(security.auth_tokens_file), access))
    elif not loopback:
        raise RuntimeError(f"refusing to serve {address} without authentication: set SEGTRAIN_AUTH_TOKENS_FILE")
    tls = security.tls_cert_file is not None and security.tls_key_file is not None
    if not tls and not loopback and not security.allow_plaintext:
        raise RuntimeError(f"refusing to serve {address} in plaintext: set SEGTRAIN_TLS_CERT_FILE and "
                           "SEGTRAIN_TLS_KEY_FILE, or SEGTRAIN_ALLOW_PLAINTEXT=true on a private network")
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
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    if tls:
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
    return server, port, health_servicer


def connect(address: str, security: SecuritySettings) -> grpc.Channel:
    """A channel to another service: TLS when a CA is configured (presenting this service's
    certificate for mutual TLS), carrying this service's token when one is configured."""
    if security.tls_ca_file is not None:
        client_pair = (_read(security.tls_key_file), _read(security.tls_cert_file)) \
            if security.tls_key_file and security.tls_cert_file else (None, None)
        credentials = grpc.ssl_channel_credentials(_read(security.tls_ca_file), *client_pair)
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if security.service_token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(security.service_token.get_secret_value()))
    return channel


def _read(path: Path | None) -> bytes:
    assert path is not None
    return path.read_bytes()


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def serve_until_signalled(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
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
    health_servicer.enter_graceful_shutdown()
    if on_stop is not None:
        on_stop()
    server.stop(grace_s).wait()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
