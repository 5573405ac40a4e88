"""The one place where domain errors become gRPC status codes.

Every server installs `ErrorMappingInterceptor`. Domain errors map to their code with a safe
message (and google.rpc.BadRequest details naming each bad field, QuotaFailure the quota used
up); anything else is logged with an
incident id and reaches the client as INTERNAL "internal error (incident ...)": exception text,
paths and secrets never leave the process.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import sqlalchemy.exc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors, request_limits

log = logging.getLogger(__name__)

_CODES: list[tuple[type[errors.DomainError], grpc.StatusCode]] = [
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.CancelledError, grpc.StatusCode.CANCELLED),
]


def to_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a client sees for `exc`."""
    if isinstance(exc, sqlalchemy.exc.OperationalError):  # the database is down or unreachable
        log.warning("database unavailable: %s", type(exc.orig).__name__)
        exc = errors.UnavailableError("the database is unavailable; retry later")
    code = next((c for t, c in _CODES if isinstance(exc, t)), None)
    if code is None or not isinstance(exc, errors.DomainError):
        incident = uuid.uuid4().hex[:12]
        log.error("unhandled error (incident %s)", incident, exc_info=exc)
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (incident {incident})")
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    detail: Message | None = None
    if isinstance(exc, errors.InvalidArgumentError):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ])
    elif isinstance(exc, errors.OutOfRangeError) and exc.first_held is not None:
        detail = error_details_pb2.ErrorInfo(reason="EVENTS_EXPIRED", domain="segtrain",
                                             metadata={"first_held_seq": str(exc.first_held)})
    elif isinstance(exc, errors.QuotaExceededError):
        detail = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=exc.subject, description=f"{exc.quota}: {exc.message}")])
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    context.abort_with_status(rpc_status.to_status(to_status(exc)))


def _wrap_unary(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            request_limits.refuse_oversized(request)
            return behaviour(request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            _abort(context, exc)
    return handler


def _wrap_stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            request_limits.refuse_oversized(request)
            yield from behaviour(request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            _abort(context, exc)
    return handler


def _is_abort(exc: Exception, context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code; let it through untouched.
    return type(exc) is Exception and context.code() is not None  # type: ignore[attr-defined]


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Refuses requests over their field limits (services.common.request_limits) and maps
    exceptions raised by servicers (unary and server-streaming) to status codes."""

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


def bad_request_fields(error: grpc.RpcError) -> dict[str, str]:
    """Client side: the field violations carried by an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: dict[str, str] = {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            fields.update({v.field: v.description for v in request.field_violations})
    return fields
