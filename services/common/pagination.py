"""Offset-based page tokens for List RPCs (opaque to clients)."""

from __future__ import annotations

import base64
from typing import TypeVar

from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

from services.common.errors import InvalidArgumentError

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page(session: Session, query: SelectOfScalar[T], page_size: int, page_token: str) -> tuple[list[T], str]:
    """Runs `query` for one page; returns the rows and the next page token ("" on the last page)."""
    if page_size < 0:
        raise InvalidArgumentError.of("page_size", "must be >= 0")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    offset = _decode(page_token)
    rows = list(session.exec(query.offset(offset).limit(size + 1)).all())
    more = len(rows) > size
    return rows[:size], _encode(offset + size) if more else ""


def _encode(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
        if kind != "o" or offset < 0:
            raise ValueError
        return offset
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgumentError.of("page_token", "not a token from a previous response") from None


