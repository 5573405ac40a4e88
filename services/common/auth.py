"""Authentication and authorisation of every RPC, streams included.

Callers present `authorization: Bearer <token>` metadata. Tokens are configured in a JSON file
(SEGTRAIN_AUTH_TOKENS_FILE, format and roles in services/common/tokens.py) holding only their
SHA-256, each with a principal name and a role.
Roles are ranked: viewer (read and watch) < trainer (create training sets, create/start/cancel
jobs, analyse) < admin (pipelines, nodes) < service (the services' own calls to each other).
Trainer nodes hold node tokens, bound to their node id (services/common/tokens.py): good for
registering and heartbeating that node only. A trainer node accepts its own token alone: the
pipeline service calls each node with that node's token.
Each service declares the minimum role of each of its RPCs; an RPC missing from that table is
refused (fail closed). Health checking and reflection are open. Tokens never appear in logs or
errors. The caller of the call being served is `CALLER` (the servicer reaches it through
services.common.gate.CallState).
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# The tokens file's format and the roles have their own module (plain data, importable by the local
# stack launcher without this server code); re-exported here for the services and scripts.
from services.common.tokens import NODE_TOKEN_PREFIX, node_of_token, read_tokens_file
from services.common.tokens import Principal as Principal
from services.common.tokens import Role as Role
from services.common.tokens import token_digest as token_digest
from services.common.tokens import write_tokens_file as write_tokens_file

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


# The principal of the call being served; None without authentication (loopback only).
CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("caller", default=None)


class TokenStore:
    """Token digests -> principals, loaded from the tokens file; with a node key, node tokens too."""

    def __init__(self, principals: Mapping[str, Principal], node_key: bytes | None = None) -> None:
        self._by_digest = dict(principals)
        self._node_key = node_key

    @classmethod
    def load(cls, path: Path, node_key: bytes | None = None) -> TokenStore:
        """Reads a tokens file; with the node key, node tokens are known too (services/common/tokens.py)."""
        return cls({digest: Principal(name, role) for digest, (name, role) in read_tokens_file(path).items()},
                   node_key)

    @classmethod
    def of_node(cls, token: str, caller: str = "pipeline") -> TokenStore:
        """What a trainer node accepts: its own token (the pipeline service calls it with it)."""
        return cls({token_digest(token): Principal(caller, Role.SERVICE)})

    def authenticate(self, token: str) -> Principal | None:
        if self._node_key is not None and token.startswith(f"{NODE_TOKEN_PREFIX}."):
            node_id = node_of_token(self._node_key, token)
            return Principal(f"node {node_id}", Role.NODE, node_id) if node_id else None
        digest = token_digest(token)
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):  # constant time per entry
                return principal
        return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid token (UNAUTHENTICATED) or with too small a role
    (PERMISSION_DENIED), before the servicer runs, for unary and streaming RPCs alike."""

    def __init__(self, store: TokenStore, access: Mapping[str, Role]) -> None:
        self._store = store
        self._access = dict(access)  # full method name -> minimum role

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        method: str = details.method
        if method.startswith(OPEN_SERVICES):
            return continuation(details)
        needed = self._access.get(method)
        token = bearer_token(details.invocation_metadata)
        principal = self._store.authenticate(token) if token else None
        if principal is None:
            return _deny(continuation(details), grpc.StatusCode.UNAUTHENTICATED,
                         "missing or invalid bearer token")
        if needed is None or not principal.role.grants(needed):
            log.info("%s (%s) denied %s", principal.name, principal.role.name.lower(), method)
            return _deny(continuation(details), grpc.StatusCode.PERMISSION_DENIED, needs(needed))
        return continuation(details)


def needs(role: Role | None) -> str:
    """The refusal of a call that needs `role` (None: a method no table lists)."""
    if role is None:
        return "no role may make this call"
    if role is Role.NODE:
        return "this call needs a trainer node's own token"
    return f"this call needs the {role.name.lower()} role"


def bearer_token(metadata: Any) -> str:
    """The bearer token of a call's metadata (empty when none)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return ""


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None:
        return None
    if handler.unary_stream:
        def abort_stream(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)
            yield  # pragma: no cover - makes this a generator

        return grpc.unary_stream_rpc_method_handler(abort_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(abort, handler.request_deserializer, handler.response_serializer)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Client side: adds the token to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
