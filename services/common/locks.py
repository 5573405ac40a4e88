"""Locks across processes, for replicas sharing one database: one replica does a piece of work
while the others wait (`wait=True`: migrating the schema at start) or skip it (forwarding the
outbox, preparing one training set, a collection pass).

A lock is released when its block ends or when its holder dies, never by a timeout: a session
advisory lock on PostgreSQL, on a connection of its own; a file lock in a folder beside a SQLite
file (replicas on one machine; flock locks belong to open files, so two holders in one process
exclude each other too). A database of one process alone (SQLite in memory) needs none.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine


def lock_key(name: str) -> int:
    """The PostgreSQL advisory lock key of `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def exclusive(engine: Engine, name: str, *, wait: bool = False) -> Iterator[bool]:
    """Holds the lock `name` while the block runs and yields True; or, when another holder has it
    and `wait` is False, yields False at once."""
    if engine.dialect.name == "postgresql":
        key = lock_key(name)
        with engine.connect() as connection:
            take = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            held = connection.execute(text(f"SELECT {take}(:key)"), {"key": key}).scalar() is not False
            connection.commit()
            try:
                yield held
            finally:
                if held:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
        return
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        yield True
        return
    folder = Path(f"{path}.locks")
    folder.mkdir(exist_ok=True)
    with open(folder / hashlib.sha256(name.encode()).hexdigest()[:32], "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
