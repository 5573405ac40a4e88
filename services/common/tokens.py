"""The tokens file (SEGTRAIN_AUTH_TOKENS_FILE): the roles and the one format of bearer-token
digests, written by `scripts/make_tokens.py` and the local stack launcher and read by every
service (services/common/auth.py enforces it). Plain data: no gRPC.

    {"tokens": [{"name": "alice", "role": "viewer|trainer|admin|service", "sha256": "<hex digest>"}]}

Trainer nodes have tokens of their own, bound to one node id and listed nowhere: each is derived
from the node key (SEGTRAIN_NODE_KEY, which only the pipeline service holds) and the node id,
`segtrain-node.<node id>.<HMAC-SHA256(key, node id)>`, so the pipeline service verifies a node's
token without storing it, and calls each node with that node's own token, never its service token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class Role(enum.IntEnum):
    """Ranked: viewer (read and watch) < trainer < admin < service (the services' own calls).
    NODE stands apart from the ranking: a trainer node's token may register and heartbeat that
    node and nothing else, and no other role may do that."""

    NODE = 0
    VIEWER = 1
    TRAINER = 2
    ADMIN = 3
    SERVICE = 4

    def grants(self, needed: Role) -> bool:
        """Whether a caller of this role may make a call that needs `needed`."""
        if Role.NODE in (self, needed):
            return self is needed
        return self >= needed


@dataclass(frozen=True)
class Principal:
    """Who makes a call: a token's name and role (and, for a node token, its node id)."""

    name: str
    role: Role
    node: str | None = None

    def is_node(self, node_id: str) -> bool:
        return self.role is Role.NODE and self.node == node_id


# The roles a tokens file lists (node tokens are derived, see the module doc).
LISTED_ROLES = tuple(role for role in Role if role is not Role.NODE)
NODE_TOKEN_PREFIX = "segtrain-node"


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
    found = {entry["sha256"].lower(): (entry["name"], Role[entry["role"].upper()]) for entry in data["tokens"]}
    if any(role is Role.NODE for _, role in found.values()):
        raise ValueError(f"{path}: node tokens are derived from the node key, not listed in a tokens file")
    return found


def node_token(key: bytes, node_id: str) -> str:
    """The token of trainer node `node_id` under the node key."""
    return f"{NODE_TOKEN_PREFIX}.{node_id}.{_node_mac(key, node_id)}"


def node_of_token(key: bytes, token: str) -> str | None:
    """The node id a node token is valid for under `key`, or None (not a node token, or forged)."""
    prefix, _, rest = token.partition(".")
    node_id, _, mac = rest.rpartition(".")
    if prefix != NODE_TOKEN_PREFIX or not node_id:
        return None
    return node_id if hmac.compare_digest(mac, _node_mac(key, node_id)) else None


def _node_mac(key: bytes, node_id: str) -> str:
    return hmac.new(key, b"segtrain node token\0" + node_id.encode(), hashlib.sha256).hexdigest()


def new_node_key() -> str:
    """A random node key (256 bits), as hex: what SEGTRAIN_NODE_KEY holds."""
    return secrets.token_hex(32)


def parse_node_key(text: str) -> bytes:
    """The node key of its hex text; at least 128 bits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("SEGTRAIN_NODE_KEY must be hex (scripts/make_tokens.py makes one)") from None
    if len(key) < 16:
        raise ValueError("SEGTRAIN_NODE_KEY must hold at least 128 bits (32 hex digits)")
    return key
