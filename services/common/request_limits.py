"""Size limits of request fields, declared in the protos and enforced for every call.

Each field may carry `(segtrain.limits.v1.max_len)` (characters of a string, or of each string
of a repeated one) and `(segtrain.limits.v1.max_items)` (elements of a repeated or map field);
a string without one holds at most DEFAULT_MAX_LEN characters and a repeated field at most
DEFAULT_MAX_ITEMS elements. `violations(request)` walks the fields a request has set, nested
messages included, and names each one over its limit with its path (`tiles[3].image_key`).
Every server (services.common.gate, and services.common.interceptor for the threaded one)
refuses such a request with INVALID_ARGUMENT before its handler runs, so no string reaches a
database column or a log line unbounded. The walk costs one step per set field of the messages
large enough to break a limit, and stops after MAX_REPORTED.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from segtrain.limits.v1 import limits_pb2

from services.common.errors import FieldViolation, check

DEFAULT_MAX_LEN = 1024
DEFAULT_MAX_ITEMS = 1000
MAX_REPORTED = 20  # violations named in one refusal
SERVICES = ("segtrain.pipeline.v1.PipelineService", "segtrain.metrics.v1.MetricsService",
            "segtrain.trainer.v1.TrainerService")

_STRING = FieldDescriptor.TYPE_STRING
_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def refuse_oversized(request: object) -> None:
    """InvalidArgumentError naming each field of the request over its limit. A streaming request
    (an iterator) is not a message and has no limits here."""
    if isinstance(request, Message):
        check(violations(request))


def violations(request: Message) -> list[FieldViolation]:
    """The request's fields over their limits (at most MAX_REPORTED)."""
    found: list[FieldViolation] = []
    _walk(request, "", found)
    return found[:MAX_REPORTED]


@functools.cache
def field_limits(field: FieldDescriptor) -> tuple[int, int]:
    """(max_len, max_items) of a field: its options, or the defaults."""
    options = field.GetOptions()
    return (options.Extensions[limits_pb2.max_len] or DEFAULT_MAX_LEN,
            options.Extensions[limits_pb2.max_items] or DEFAULT_MAX_ITEMS)


@functools.cache
def _smallest_limit(descriptor: Descriptor) -> int:
    """The smallest limit of any field in messages of this type, nested ones included. A message
    that serializes to no more bytes cannot exceed it (a string of n characters takes n bytes or
    more, a list of n elements n bytes or more), so it need not be walked: most messages, such
    as the events of an append, are passed in one C call (ByteSize)."""
    return min([DEFAULT_MAX_LEN, DEFAULT_MAX_ITEMS,
                *(limit for d in _reachable([descriptor]) for f in d.fields for limit in field_limits(f))])


def _reachable(roots: Iterable[Descriptor]) -> Iterator[Descriptor]:
    """`roots` and every message type their fields hold, each once (message types may nest
    themselves)."""
    pending = list(roots)
    seen = {d.full_name for d in pending}
    while pending:
        descriptor = pending.pop()
        yield descriptor
        for field in descriptor.fields:
            if field.type == _MESSAGE and field.message_type.full_name not in seen:
                seen.add(field.message_type.full_name)
                pending.append(field.message_type)


def _walk(message: Message, prefix: str, found: list[FieldViolation]) -> None:
    if message.ByteSize() <= _smallest_limit(message.DESCRIPTOR):
        return
    for field, value in message.ListFields():
        if len(found) >= MAX_REPORTED:
            return
        path = prefix + field.name
        max_len, max_items = field_limits(field)
        if _is_map(field):
            _check_map(field, value, path, max_len, max_items, found)
        elif field.is_repeated:
            if len(value) > max_items:
                found.append(FieldViolation(path, f"at most {max_items:,} items (got {len(value):,})"))
            elif field.type == _MESSAGE:
                for i, item in enumerate(value):
                    _walk(item, f"{path}[{i}].", found)
            elif field.type == _STRING and value and max(map(len, value)) > max_len:
                _name_long(value, path, max_len, found)
        elif field.type == _MESSAGE:
            _walk(value, path + ".", found)
        elif _bounded_scalar(field) and len(value) > max_len:
            found.append(FieldViolation(path, f"at most {max_len:,} characters (got {len(value):,})"))


def _check_map(field: FieldDescriptor, value: Mapping[Any, Any], path: str, max_len: int, max_items: int,
               found: list[FieldViolation]) -> None:
    if len(value) > max_items:
        found.append(FieldViolation(path, f"at most {max_items:,} entries (got {len(value):,})"))
        return
    entry: Descriptor = field.message_type
    value_field = entry.fields_by_name["value"]
    for key, item in value.items():
        where = f"{path}[{str(key)[:40]!r}]"
        if isinstance(key, str) and len(key) > max_len:
            found.append(FieldViolation(where, f"keys hold at most {max_len:,} characters (got {len(key):,})"))
        elif value_field.type == _MESSAGE:
            _walk(item, where + ".", found)
        elif value_field.type == _STRING and len(item) > max_len:
            found.append(FieldViolation(where, f"at most {max_len:,} characters (got {len(item):,})"))


def _name_long(values: Iterable[str], path: str, max_len: int, found: list[FieldViolation]) -> None:
    for i, item in enumerate(values):
        if len(item) > max_len:
            found.append(FieldViolation(f"{path}[{i}]", f"at most {max_len:,} characters (got {len(item):,})"))
            if len(found) >= MAX_REPORTED:
                return


@functools.cache
def _bounded_scalar(field: FieldDescriptor) -> bool:
    """Strings always; bytes only where a limit is declared (the message size bounds the rest)."""
    return field.type == _STRING or (field.type == _BYTES and bool(field.GetOptions().Extensions[limits_pb2.max_len]))


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == _MESSAGE and field.message_type.GetOptions().map_entry


def markdown_table(services: Iterable[str] = SERVICES) -> str:
    """The README's table of the request fields with limits other than the defaults, over the
    requests of `services` (full names) and the messages they hold."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    rows: dict[str, str] = {}
    requests = [m.input_type for s in services for m in pool.FindServiceByName(s).methods]
    for descriptor in _reachable(requests):
        for field in descriptor.fields:
            options = field.GetOptions()
            declared = [f"{options.Extensions[limits_pb2.max_len]:,} characters"] * bool(
                options.Extensions[limits_pb2.max_len])
            declared += [f"{options.Extensions[limits_pb2.max_items]:,} items"] * bool(
                options.Extensions[limits_pb2.max_items])
            if declared:
                rows[f"`{descriptor.full_name.removeprefix('segtrain.')}.{field.name}`"] = ", ".join(declared)
    lines = ["| Field | At most |", "|---|---|"]
    lines += [f"| {name} | {limit} |" for name, limit in sorted(rows.items())]
    lines.append(f"| any other string | {DEFAULT_MAX_LEN:,} characters |")
    lines.append(f"| any other repeated field | {DEFAULT_MAX_ITEMS:,} items |")
    return "\n".join(lines)
