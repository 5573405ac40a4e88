"""Node tokens and the roles' order: a node token is bound to one node id under one key, and the
node role grants nothing any other role has (nor does any other role grant it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.auth import TokenStore
from services.common.tokens import LISTED_ROLES, Principal, Role, node_of_token, node_token, parse_node_key

KEY, OTHER = parse_node_key("ab" * 32), parse_node_key("cd" * 32)


def test_the_node_role_stands_apart_from_the_ranking() -> None:
    assert Role.NODE.grants(Role.NODE)
    for role in LISTED_ROLES:
        assert not role.grants(Role.NODE), role  # not even the services' own token registers a node
        assert not Role.NODE.grants(role), role
        assert all(role.grants(lower) == (role >= lower) for lower in LISTED_ROLES)


@pytest.mark.parametrize("token", [
    node_token(OTHER, "node-a"),  # another key
    node_token(KEY, "node-a").replace("node-a", "node-b"),  # another node under node a's mac
    node_token(KEY, "node-a")[:-1],  # cut short
    "segtrain-node.node-a",  # no mac
    "segtrain-node..abc",  # no node id
    "not-a-node-token",
])
def test_a_node_token_is_valid_for_its_node_under_its_key_only(token: str) -> None:
    assert node_of_token(KEY, node_token(KEY, "node-a")) == "node-a"
    assert node_of_token(KEY, token) is None


def test_node_keys_are_hex_of_at_least_128_bits() -> None:
    with pytest.raises(ValueError, match="hex"):
        parse_node_key("not hex")
    with pytest.raises(ValueError, match="128 bits"):
        parse_node_key("ab" * 8)


def test_make_tokens_writes_what_the_services_accept(tmp_path: Path) -> None:
    folder = tmp_path / "deploy"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "scripts/make_tokens.py", str(folder), "--node", "trainer-1"], cwd=root,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines()
                   if line.startswith("export "))
    store = TokenStore.load(folder / "tokens.json", parse_node_key(exports["SEGTRAIN_NODE_KEY"]))
    assert store.authenticate(exports["SEGTRAIN_NODE_TOKEN_TRAINER_1"]) == Principal("node trainer-1", Role.NODE,
                                                                                     "trainer-1")
    credentials = json.loads((folder / "credentials.json").read_text())
    assert store.authenticate(credentials["service"]).role is Role.SERVICE  # type: ignore[union-attr]
    assert (folder / "credentials.json").stat().st_mode & 0o077 == 0
