"""Finding one row by its resource name, by its idempotency key, or a page of rows of one
pipeline: the lookups every resource shares, written once."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session, SQLModel, col, select

from services.common import names
from services.common.errors import NotFoundError
from services.common.pagination import page

Row = TypeVar("Row", bound=SQLModel)


def get_by_name(session: Session, *, table: type[Row], collection: str, name: str, field: str = "name",
                for_update: bool = False) -> Row:
    """The row of `collection/{id}` (a bare id is accepted); INVALID_ARGUMENT naming `field` for a
    malformed name, NOT_FOUND naming the resource when there is none."""
    resource_id = names.parse_name(name, collection, field=field)
    row = session.get(table, resource_id, with_for_update=for_update)
    if row is None:
        raise NotFoundError(names.format_name(collection, resource_id))
    return row


def by_request_id(session: Session, *, table: type[Row], request_id: str) -> Row | None:
    """The row an earlier call with the same `request_id` created (retries return it)."""
    if not request_id:
        return None
    column: Any = table.request_id  # type: ignore[attr-defined]
    return session.exec(select(table).where(column == request_id)).first()


def list_page(session: Session, *, table: type[Row], pipeline: str = "", page_size: int, page_token: str,
              newest_first: bool = True, where: Any = None, owner: str = "") -> tuple[list[Row], str]:
    """One page of `table`'s rows ordered by creation (ties by id), of one pipeline when given,
    created by `owner` when given, matching `where` (a column condition) when given."""
    created: Any = col(table.create_time)  # type: ignore[attr-defined]
    query = select(table).order_by(created.desc() if newest_first else created,
                                   col(table.id))  # type: ignore[attr-defined]
    if pipeline:
        of_pipeline: Any = table.pipeline  # type: ignore[attr-defined]
        query = query.where(of_pipeline == names.parse_name(pipeline, names.PIPELINES, field="pipeline"))
    if owner:
        created_by: Any = table.owner  # type: ignore[attr-defined]
        query = query.where(created_by == owner)
    if where is not None:
        query = query.where(where)
    return page(session, query, page_size, page_token)
