"""Domain errors raised by service logic. They know nothing of gRPC; services.common.interceptor
maps them to status codes, once, for every RPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field (or tile) and what is wrong with it."""

    field: str
    description: str


class DomainError(Exception):
    """Base of errors whose message is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(DomainError):
    """A named resource does not exist."""

    def __init__(self, resource: str) -> None:
        super().__init__(f"{resource} not found")
        self.resource = resource


class AlreadyExistsError(DomainError):
    """A resource with that name exists with different content."""


class InvalidArgumentError(DomainError):
    """The request is malformed; `violations` name every bad field."""

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        self.violations = violations if isinstance(violations, list) else [violations]
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def of(cls, field: str, description: str) -> InvalidArgumentError:
        return cls(FieldViolation(field, description))


class FailedPreconditionError(DomainError):
    """The request is valid but the system is not in a state that allows it."""


class UnavailableError(DomainError):
    """A dependency (object store, database, trainer node) cannot be reached; retry later."""


class ResourceExhaustedError(DomainError):
    """A limit was hit (buffer overflow, too many items)."""


class QuotaExceededError(ResourceExhaustedError):
    """A caller's quota is used up: `quota` names it, `subject` whose it is."""

    def __init__(self, message: str, *, quota: str, subject: str) -> None:
        super().__init__(message)
        self.quota, self.subject = quota, subject


class PermissionDeniedError(DomainError):
    """The caller is authenticated but may not act on this resource."""


class CancelledError(DomainError):
    """The caller gave up (cancelled, or its deadline passed): the work was stopped."""


class OutOfRangeError(DomainError):
    """A position (e.g. a sequence number) is outside what the server holds; `first_held`, when
    set, is the first one it still holds (the rest were let go)."""

    def __init__(self, message: str, *, first_held: int | None = None) -> None:
        super().__init__(message)
        self.first_held = first_held


def check(violations: list[FieldViolation]) -> None:
    """Raises InvalidArgumentError if any violation was collected."""
    if violations:
        raise InvalidArgumentError(violations)
