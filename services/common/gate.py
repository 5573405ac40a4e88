"""What every call of an asyncio server passes through before its servicer runs, in one place:
authentication and roles (services.common.auth), admission, the size limits of the request's
fields (services.common.request_limits), and the mapping of errors to status codes
(services.common.interceptor.to_status).

Admission (limits in ServingSettings) keeps any caller from starving the others, and never queues silently:
* unary calls: at most ``max_calls`` in flight, plus ``reserved_calls`` that only the *reserved*
  methods may use (node heartbeats, event appends: what keeps jobs alive and moving), so user
  traffic can never take the capacity the control plane needs; of ``max_calls``, the *long*
  methods (minutes of work) hold at most ``max_long_calls``. A full server answers
  RESOURCE_EXHAUSTED at once;
* streams: at most ``max_streams_per_principal`` open per authenticated principal, and
  ``max_open_streams_per_peer`` per client host for the open services (health ``Watch``,
  reflection), which need no token. On asyncio a waiting stream costs no thread, only its
  memory: the caps bound that.

Blocking work (SQL, object storage, torch) runs in ``Executors``: two bounded thread pools, the
reserved methods' own and everyone else's, sized apart from the admission limits so a full pool
delays calls without ever letting them pile up beyond the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_status import rpc_status

from services.common import request_limits
from services.common.auth import CALLER, OPEN_SERVICES, Principal, Role, TokenStore, bearer_token, needs
from services.common.interceptor import to_status
from services.common.settings import ServingSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class Executors:
    """The two bounded thread pools blocking work runs in."""

    def __init__(self, limits: ServingSettings) -> None:
        self._user = ThreadPoolExecutor(limits.blocking_threads, thread_name_prefix="blocking")
        self._reserved = ThreadPoolExecutor(limits.reserved_threads, thread_name_prefix="reserved")

    async def run(self, fn: Callable[..., T], *args: Any, reserved: bool = False) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reserved if reserved else self._user, lambda: fn(*args))

    def shutdown(self) -> None:
        self._user.shutdown(wait=False, cancel_futures=True)
        self._reserved.shutdown(wait=False, cancel_futures=True)


class _Admission:
    """Counts of what is in flight; all of it runs on the server's event loop (no locks)."""

    def __init__(self, limits: ServingSettings) -> None:
        self.limits = limits
        self.calls = 0
        self.reserved = 0
        self.long = 0
        self.streams: Counter[str] = Counter()  # by principal name, or "peer:<host>" for open streams

    def enter_call(self, reserved: bool, long: bool = False) -> Callable[[], None] | None:
        if reserved and self.reserved < self.limits.reserved_calls:
            self.reserved += 1
            return self._leave_reserved
        if long and self.long >= self.limits.max_long_calls:
            return None
        if self.calls < self.limits.max_calls:
            self.calls += 1
            if long:
                self.long += 1
                return self._leave_long
            return self._leave_call
        return None

    def _leave_call(self) -> None:
        self.calls -= 1

    def _leave_long(self) -> None:
        self.calls -= 1
        self.long -= 1

    def _leave_reserved(self) -> None:
        self.reserved -= 1

    def enter_stream(self, key: str, cap: int) -> Callable[[], None] | None:
        if self.streams[key] >= cap:
            return None
        self.streams[key] += 1

        def leave() -> None:
            self.streams[key] -= 1
            if not self.streams[key]:
                del self.streams[key]
        return leave


class Gate(grpc.aio.ServerInterceptor):
    """Authenticates, authorises and admits every call (see the module doc), and maps the errors
    of servicers to status codes. `store` None: no authentication (loopback only), every caller
    is an anonymous principal."""

    def __init__(self, store: TokenStore | None, access: Mapping[str, Role], reserved: Collection[str],
                 limits: ServingSettings, long: Collection[str] = ()) -> None:
        self._store, self._access, self._reserved = store, dict(access), frozenset(reserved)
        self._long = frozenset(long)
        self.admission = _Admission(limits)

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        open_method = method.startswith(OPEN_SERVICES)
        principal: Principal | None = None
        if not open_method:
            denied = self._denial(method, details.invocation_metadata)
            if isinstance(denied, tuple):
                return _refusing(handler, *denied)
            principal = denied
        return self._admitted(handler, method, principal, open_method)

    def _denial(self, method: str, metadata: Any) -> Principal | tuple[grpc.StatusCode, str] | None:
        """The caller's principal, or the status that refuses the call."""
        needed = self._access.get(method)
        if self._store is None:
            return None if needed is not None else (grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        token = bearer_token(metadata)
        principal = self._store.authenticate(token) if token else None
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        if needed is None or not principal.role.grants(needed):
            log.info("%s (%s) denied %s", principal.name, principal.role.name.lower(), method)
            return grpc.StatusCode.PERMISSION_DENIED, needs(needed)
        return principal

    def _admitted(self, handler: Any, method: str, principal: Principal | None, open_method: bool) -> Any:
        admission, limits = self.admission, self.admission.limits
        reserved, long = method in self._reserved, method in self._long

        def stream_ticket(context: grpc.aio.ServicerContext) -> Callable[[], None] | None:
            if open_method:
                return admission.enter_stream(f"peer:{_host(context.peer())}", limits.max_open_streams_per_peer)
            # Without authentication (loopback only) every caller is one anonymous principal.
            name = principal.name if principal is not None else "anonymous"
            return admission.enter_stream(name, limits.max_streams_per_principal)

        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                leave = admission.enter_call(reserved, long)
                if leave is None:
                    what = "long calls of this kind" if long else "concurrent calls"
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"the server is at its limit of {what}; retry with backoff")
                CALLER.set(principal)  # this call's own task: seen by it and its blocking work
                try:
                    return await _mapped(lambda: behaviour(request, context), request, context)
                finally:
                    leave()  # type: ignore[misc]
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        streaming = handler.unary_stream or handler.stream_stream
        if streaming is None:
            return handler  # client streaming: none of our services has one

        async def stream_admission(context: grpc.aio.ServicerContext) -> Callable[[], None]:
            leave = stream_ticket(context)
            if leave is None:
                who = "this client host" if open_method else "this principal"
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"too many open streams for {who}; close some and retry")
            return leave  # type: ignore[return-value]

        if inspect.isasyncgenfunction(streaming):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                leave = await stream_admission(context)
                CALLER.set(principal)
                try:
                    request_limits.refuse_oversized(request)
                    async for item in streaming(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await context.abort_with_status(rpc_status.to_status(to_status(exc)))
                finally:
                    leave()
            wrapped: Callable[..., Any] = stream
        else:  # a coroutine that writes its messages (grpc_health's Watch)
            async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                leave = await stream_admission(context)
                try:
                    await _mapped(lambda: streaming(request, context), request, context)
                finally:
                    leave()
            wrapped = writer
        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(wrapped, handler.request_deserializer, _bytes_as_is(handler.response_serializer))


async def _mapped(call: Callable[[], Any], request: Any, context: grpc.aio.ServicerContext) -> Any:
    """The call's result once the request is within its limits; errors become statuses."""
    try:
        request_limits.refuse_oversized(request)
        result = call()
        return await result if asyncio.iscoroutine(result) else result
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await context.abort_with_status(rpc_status.to_status(to_status(exc)))


def _bytes_as_is(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A stream may yield messages already serialized (one event sent to many watchers is
    serialized once): bytes pass as they are."""
    if serializer is None:
        return None
    return lambda message: message if isinstance(message, bytes) else serializer(message)


def _refusing(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                 handler.response_serializer)


def _host(peer: str) -> str:
    """The client host of a gRPC peer string ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer  # unix sockets and others: the whole string


class BlockingServicer:
    """A synchronous servicer's unary methods as coroutines: each call runs in `executors`, in
    the reserved pool for the `reserved` methods. The call's context is replaced by a
    ``CallState`` the blocking code can poll (``is_active()``): a cancelled call or an expired
    deadline turns it false."""

    def __init__(self, servicer: Any, executors: Executors, reserved: Collection[str]) -> None:
        self._servicer, self._executors, self._reserved = servicer, executors, frozenset(reserved)

    def __getattr__(self, name: str) -> Any:
        blocking = getattr(self._servicer, name)
        if not callable(blocking) or name.startswith("_"):
            return blocking
        reserved = name in self._reserved

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = CallState(context.time_remaining(), CALLER.get())
            work = asyncio.ensure_future(self._executors.run(blocking, request, state, reserved=reserved))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # The client left: tell the work, and keep the call's admission until it has
                # stopped (abandoned calls must not free capacity their threads still hold).
                state.cancel()
                with contextlib.suppress(BaseException):
                    await work
                raise
        return call


class CallState:
    """What blocking code may ask of its call: whether it is still wanted, and who made it
    (`principal`: None without authentication, loopback only)."""

    def __init__(self, time_remaining: float | None, principal: Principal | None = None) -> None:
        self.principal = principal
        self._cancelled = threading.Event()
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining

    def cancel(self) -> None:
        self._cancelled.set()

    def is_active(self) -> bool:
        if self._cancelled.is_set():
            return False
        return self._deadline is None or time.monotonic() < self._deadline
