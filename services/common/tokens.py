"""The tokens file (SEGTRAIN_AUTH_TOKENS_FILE): the roles and the one format of bearer-token
digests, written by `scripts/make_tokens.py` and the local stack launcher and read by every
service (services/common/auth.py enforces it). Plain data: no gRPC.

    {"tokens": [{"name": "alice", "role": "viewer|trainer|admin|service", "sha256": "<hex digest>"}]}
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path


class Role(enum.IntEnum):
    """Ranked: viewer (read and watch) < trainer < admin < service (the services' own calls)."""

    VIEWER = 1
    TRAINER = 2
    ADMIN = 3
    SERVICE = 4


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_tokens_file(path: Path, tokens: Mapping[str, tuple[str, Role]]) -> None:
    """Writes a tokens file for {token: (name, role)}. Only digests are stored (SHA-256 of 256-bit
    random tokens: nothing to recover a token from), so it is readable by all (0644): a service
    running as another user, such as a container's, must read it; only its owner may change it."""
    entries = [{"name": name, "role": role.name.lower(), "sha256": token_digest(token)}
               for token, (name, role) in tokens.items()]
    _write(path, json.dumps({"tokens": entries}, indent=2), 0o644)


def write_credentials_file(path: Path, tokens: Mapping[str, str]) -> None:
    """Writes the plaintext tokens ({role: token}) for the people they are for, readable by the
    owner only: `{"viewer": "...", "trainer": "...", ...}`."""
    _write(path, json.dumps(dict(tokens), indent=2), 0o600)


def _write(path: Path, text: str, mode: int) -> None:
    """Replaces `path` atomically with a file created with `mode` (never wider, not even
    briefly: the temporary file has it from its creation), in the same folder."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(fd, mode)
            file.write(text)
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_tokens_file(path: Path) -> dict[str, tuple[str, Role]]:
    """{lower-case digest: (name, role)} of a tokens file."""
    data = json.loads(path.read_text())
    return {entry["sha256"].lower(): (entry["name"], Role[entry["role"].upper()]) for entry in data["tokens"]}
