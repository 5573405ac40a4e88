"""Prometheus metrics of every service (prometheus_client), served over HTTP on
SEGTRAIN_PROMETHEUS_LISTEN (unset: not served).

RPCs are counted and timed by a server interceptor under the names the gRPC ecosystem's exporters
use (go-grpc-prometheus, grpc-ecosystem/py-grpc-prometheus), so existing dashboards and alerts
work: ``grpc_server_started_total``, ``grpc_server_handled_total`` (by ``grpc_code``) and the
``grpc_server_handling_seconds`` histogram, each labelled ``grpc_service``, ``grpc_method`` and
``grpc_type``. A stream is timed until it ends. Each service adds its own ``segtrain_*`` series
(README, "Observability"): those read from the database are collected when scraped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LABELS = ("grpc_service", "grpc_method", "grpc_type")
STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, whatever their status.",
                  (*_LABELS, "grpc_code"))
HANDLING = Histogram("grpc_server_handling_seconds", "Seconds from the start of an RPC to its end (a stream: "
                     "until it ends).", _LABELS,
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                              1800, 3600))


def serve(listen: str | None, service: str) -> int | None:
    """Serves /metrics of this process on `listen` ("host:port"; port 0: one the kernel picks),
    printing ``METRICS <service> <port>`` (the local stack reads it); the port, or None when unset."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)
    bound = int(server.server_port)
    print(f"METRICS {service} {bound}", flush=True)
    log.info("Prometheus metrics on http://%s:%s/metrics", host or "0.0.0.0", bound)
    return bound


def register(collector: Collector) -> None:
    """Adds a service's collector (read when scraped), replacing one of the same type: a process
    serves one service, except in tests, where the last one built is the one scraped."""
    for registered in list(_COLLECTORS):
        if type(registered) is type(collector):
            REGISTRY.unregister(registered)
            _COLLECTORS.remove(registered)
    REGISTRY.register(collector)
    _COLLECTORS.append(collector)


_COLLECTORS: list[Collector] = []


def _labels(method: str, kind: str) -> tuple[str, str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name, kind


def _kind(handler: Any) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    return "client_stream" if handler.stream_unary else "bidi_stream"


def _code(context: Any, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio keeps the number of an aborted call's code
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default.name)
    return default.name


class _Timed:
    """Counts one call started, then ended with its status (the context's, else OK when the
    handler returned and `failed` when it raised), and times it."""

    def __init__(self, labels: tuple[str, str, str], context: Any, failed: grpc.StatusCode) -> None:
        self._labels, self._context, self._failed = labels, context, failed

    def __enter__(self) -> None:
        STARTED.labels(*self._labels).inc()
        self._started = time.perf_counter()

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        code = _code(self._context, grpc.StatusCode.OK if error is None else self._failed)
        HANDLED.labels(*self._labels, code).inc()
        HANDLING.labels(*self._labels).observe(time.perf_counter() - self._started)


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every call of a grpc.aio server. Placed first, so that what the gate
    refuses (unauthenticated, over a limit) is counted too."""

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.stream_unary or handler.stream_stream:
            return handler
        labels = _labels(details.method, _kind(handler))
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with _Timed(labels, context, grpc.StatusCode.UNKNOWN):
                    return await behaviour(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        streaming = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Timed(labels, context, grpc.StatusCode.CANCELLED):
                result = streaming(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a servicer that writes through context.write()
                    await result
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class ThreadedRpcMetrics(grpc.ServerInterceptor):
    """The same for a thread-per-call server (the trainer node's)."""

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.stream_unary or handler.stream_stream:
            return handler
        labels = _labels(details.method, _kind(handler))
        if handler.unary_unary:
            behaviour = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                with _Timed(labels, context, grpc.StatusCode.UNKNOWN):
                    return behaviour(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        streaming = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _Timed(labels, context, grpc.StatusCode.CANCELLED):
                yield from streaming(request, context)
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
