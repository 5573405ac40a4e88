"""SQL engines through sqlmodel: SQLite by default, PostgreSQL by URL. Each service has its own
database and owns its schema, which its migrations keep (services/common/migrations.py).

Transactions that read a row and write it back (a job's state changes) run in a *serialized*
session (`session_scope(engine, serialized=True)`) and read their rows `with_for_update`: on
PostgreSQL that locks the rows (SELECT … FOR UPDATE) until the commit; on SQLite, whose
`with_for_update` does nothing, the transaction begins with BEGIN IMMEDIATE, holding the
database's one write lock from its first read. Either way no other writer changes what such a
transaction read before it commits: no lost update."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from services.common import migrations
from services.common.locks import lock_key
from services.common.migrations import Migrate, Schema


def make_engine(url: str, schema: Schema, *, migrate: Migrate = "auto") -> Engine:
    """The engine of a service's database, at the head of its schema's migrations (or
    SchemaMismatchError saying what to do; services/common/migrations.py)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Services use threads; SQLite connections are per-thread from the pool.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    migrations.prepare(engine, schema, migrate=migrate)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets watchers read while the relay writes; NORMAL sync is durable across process crashes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    """A serialized transaction takes the write lock before its first read. (Others keep the
    driver's way: it begins them at their first write, so their reads never hold a snapshot
    that a write of theirs could find stale.)"""
    if connection.get_execution_options().get(_SERIALIZED, False):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_SERIALIZED = "segtrain_serialized"


def lock_name(session: Session, name: str) -> None:
    """Holds a lock on `name` until the session's transaction ends, for what rows cannot lock
    (a count that a concurrent insert or update would change): an advisory transaction lock on
    PostgreSQL; on SQLite the serialized session's write lock already holds every writer off."""
    if not session.info.get("serialized"):
        raise RuntimeError("lock_name needs a serialized session")
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})


@contextmanager
def session_scope(engine: Engine, *, serialized: bool = False) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any error. `serialized`:
    for read-modify-write transactions (see the module doc); `session.info["serialized"]` says so."""
    bind = engine.execution_options(**{_SERIALIZED: True}) if serialized else engine
    with Session(bind, expire_on_commit=False) as session:
        session.info["serialized"] = serialized
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
