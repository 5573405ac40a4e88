"""Creates the credentials of a deployment: a bearer token per role, the node key, and a token
for each trainer node named.

Writes FOLDER/tokens.json (SHA-256 digests, for SEGTRAIN_AUTH_TOKENS_FILE) and
FOLDER/credentials.json (the tokens themselves, the node key and the node tokens; hand them out,
keep the file private), and prints what to export: the service token (SEGTRAIN_SERVICE_TOKEN), the
node key (SEGTRAIN_NODE_KEY, the pipeline service's only) and, for each `--node ID`, that node's
token (SEGTRAIN_TRAINER_TOKEN of the node, here as SEGTRAIN_NODE_TOKEN_<ID>).

    python scripts/make_tokens.py deploy/ --node trainer-1 --node trainer-2
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from services.common import names
from services.common.tokens import (
    LISTED_ROLES,
    Role,
    new_node_key,
    node_token,
    parse_node_key,
    write_credentials_file,
    write_tokens_file,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--node", action="append", default=[], metavar="ID",
                        help="a trainer node id to make a token for (repeatable)")
    args = parser.parse_args()
    bad = [node for node in args.node if not names.is_valid_id(node)]
    if bad:
        parser.error(f"node ids are 1-63 lowercase letters, digits or '-': {', '.join(bad)}")
    args.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # credentials.json lives here
    tokens = {role.name.lower(): secrets.token_urlsafe(32) for role in LISTED_ROLES}
    write_tokens_file(args.folder / "tokens.json",
                      {token: (f"{role}-1", Role[role.upper()]) for role, token in tokens.items()})
    key = new_node_key()
    nodes = {node: node_token(parse_node_key(key), node) for node in args.node}
    credentials = args.folder / "credentials.json"
    write_credentials_file(credentials, {**tokens, "node_key": key, **{f"node {n}": t for n, t in nodes.items()}})
    print(f"wrote {args.folder / 'tokens.json'} and {credentials}")
    print(f"export SEGTRAIN_SERVICE_TOKEN={tokens['service']}")
    print(f"export SEGTRAIN_NODE_KEY={key}")
    for node, token in nodes.items():
        print(f"export SEGTRAIN_NODE_TOKEN_{node.upper().replace('-', '_')}={token}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
