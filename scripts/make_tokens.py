"""Creates bearer tokens for a deployment: one per role plus the services' own token.

Writes FOLDER/tokens.json (SHA-256 digests, for SEGTRAIN_AUTH_TOKENS_FILE) and
FOLDER/credentials.json (the tokens themselves; hand them out, keep the file private), and prints
the service token to export as SEGTRAIN_SERVICE_TOKEN.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from services.common.tokens import Role, write_credentials_file, write_tokens_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    args.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # credentials.json lives here
    tokens = {role.name.lower(): secrets.token_urlsafe(32) for role in Role}
    write_tokens_file(args.folder / "tokens.json",
                      {token: (f"{role}-1", Role[role.upper()]) for role, token in tokens.items()})
    credentials = args.folder / "credentials.json"
    write_credentials_file(credentials, tokens)
    print(f"wrote {args.folder / 'tokens.json'} and {credentials}")
    print(f"export SEGTRAIN_SERVICE_TOKEN={tokens['service']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
