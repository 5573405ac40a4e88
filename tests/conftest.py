"""Fixtures shared by the whole suite: a real S3 API server (rclone serve s3, with credentials),
SQL database URLs (SQLite, and PostgreSQL when reachable) and in-process gRPC servers on port 0."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr

from clients.stack import free_port, rclone_binary
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite never reads or writes the user's connection profiles (clients/profiles.py): every
# process it starts, `segtrain up` included, keeps them in a file of its own.
os.environ["SEGTRAIN_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="segtrain-test-config-")) / "config.json")
for _variable in ("SEGTRAIN_PROFILE", "SEGTRAIN_ADDRESS", "SEGTRAIN_TOKEN"):
    os.environ.pop(_variable, None)

POSTGRES_URL = os.environ.get("SEGTRAIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageSettings]:
    """A real S3 API server with signature checks, for the whole session."""
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    access, secret = "segtrain-test", secrets.token_urlsafe(18)
    log = open(root.parent / "rclone.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [rclone_binary(), "serve", "s3", str(root / "data"), "--addr", f"127.0.0.1:{port}", "--config", "/dev/null"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RCLONE_AUTH_KEY": f'"{access},{secret}"'})
    try:
        _wait_listening(port, process)
        yield StorageSettings(endpoint=f"127.0.0.1:{port}", access_key=access, secret_key=SecretStr(secret),
                              bucket=f"test-{uuid.uuid4().hex[:8]}")
    finally:
        process.kill()
        process.wait()
        log.close()


@pytest.fixture(scope="session")
def store(s3_settings: StorageSettings) -> ObjectStore:
    store = ObjectStore(s3_settings)
    store.ensure_bucket()
    return store


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "rclone serve s3 exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError("rclone serve s3 did not start")


def postgres_reachable() -> str | None:
    """None if PostgreSQL answers at POSTGRES_URL, else the reason it does not."""
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure means: skip, saying why
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema-less database in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    reason = postgres_reachable()
    if reason:
        pytest.skip(reason)
    with fresh_postgres_database() as url:
        yield url


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards (its connections too)."""
    import sqlalchemy

    name = f"segtrain_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
