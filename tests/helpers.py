"""Test helpers: sample tiles on disk, uploads through the real presigned-URL path, and
inspection of what a request left behind."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import sqlalchemy
from PIL import Image

from clients.sdk import Client
from segcore import synthetic
from services.common.interceptor import bad_request_fields
from services.common.storage import ObjectStore
from services.common.tokens import node_token, parse_node_key


def write_sample_set(root: Path, count: int = 12, tile_size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    tiles = synthetic.generate_tiles(count, tile_size=tile_size, seed=seed)
    synthetic.write_tile_set(tiles, root / "tiles", root / "masks")
    return root / "tiles", root / "masks"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_bytes(client: Client, tmp: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Writes the files to `tmp` and uploads them; returns name -> object key."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        paths.append(tmp / name)
    return {p.name: key for p, key in client.upload(paths).items()}


def row_counts(database_url: str, tables: list[str]) -> dict[str, int]:
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(sqlalchemy.text(f"select count(*) from {t}")).scalar_one() for t in tables}
    finally:
        engine.dispose()


def object_keys(store: ObjectStore, prefix: str) -> set[str]:
    return set(store.list_keys(prefix))


def error_of(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")


def violation_fields(error: grpc.RpcError) -> set[str]:
    return set(bad_request_fields(error))


def decompression_bomb(fmt: str, side: int = 12_000, **save: object) -> bytes:
    """A 1-bit image of side x side pixels that compresses to a few KB (12,000²: what took the
    pipeline service to 5.5 GB when it decoded it)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format=fmt, **save)
    return buf.getvalue()


# The test deployments' node key (hex, 256 bits) and the token it gives a node id.
NODE_KEY = "5e" * 32


def node_token_of(node_id: str) -> str:
    return node_token(parse_node_key(NODE_KEY), node_id)
