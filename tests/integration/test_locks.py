"""Locks across replicas (services/common/locks.py), on SQLite files and PostgreSQL: one holder at
a time, the others skip without waiting, and a holder that dies (SIGKILL) lets go at once."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy

from services.common.locks import exclusive

HOLD = """
import sys, time
import sqlalchemy
from services.common.locks import exclusive
with exclusive(sqlalchemy.create_engine(sys.argv[1]), "the work") as held:
    print("held" if held else "skipped", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def engine(database_url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(database_url)
    yield engine
    engine.dispose()


def test_one_holder_at_a_time_and_the_others_skip(engine: sqlalchemy.Engine) -> None:
    with exclusive(engine, "the work") as first, exclusive(engine, "the work") as second, \
            exclusive(engine, "other work") as other:
        assert (first, second, other) == (True, False, True)
    with exclusive(engine, "the work") as again:
        assert again, "released when the block ended"


def test_a_waiting_holder_gets_it_when_the_first_lets_go(engine: sqlalchemy.Engine) -> None:
    order: list[str] = []
    with exclusive(engine, "the work"):
        def wait() -> None:
            with exclusive(engine, "the work", wait=True) as held:
                order.append(f"second {held}")
        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(0.5)
        order.append("first done")
    waiter.join(10)
    assert order == ["first done", "second True"]


def test_a_holder_that_dies_lets_go(database_url: str, engine: sqlalchemy.Engine) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, database_url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with exclusive(engine, "the work") as held:
            assert not held
        holder.kill()
        holder.wait(10)
        # PostgreSQL ends the dead holder's session as soon as its socket closes.
        for _ in range(50):
            with exclusive(engine, "the work") as held:
                if held:
                    break
            threading.Event().wait(0.1)
        assert held, "a dead holder's lock was not released"
    finally:
        holder.kill()
        holder.wait()
