"""Connection profiles: where a deployment is and how to reach it (address, token, TLS files),
kept in the user's config file so that a shell needs no exports, as kubectl's and the cloud CLIs'
contexts do.

The file is ``$SEGTRAIN_CONFIG`` or ``$XDG_CONFIG_HOME/segtrain/config.json`` (default
``~/.config/segtrain/config.json``), written 0600 in a 0700 folder, atomically:

    {"current": "local", "profiles": {"local": {"address": "127.0.0.1:50051", "token": "...",
                                                "tls_ca_file": null, ...}}}

`segtrain up` writes the profile ``local`` and makes it current; `segtrain login` writes any.
What a connection uses, field by field, first found wins: the caller's argument (`--address`,
`--token`), the ``SEGTRAIN_*`` environment variables, the profile (``--profile``,
``$SEGTRAIN_PROFILE``, else the current one), the defaults.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

LOCAL = "local"


class ProfileError(ValueError):
    """A profile that is named but not in the config file, or a config file that cannot be read."""


@dataclass(frozen=True)
class Profile:
    address: str
    token: str = ""
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Profile:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


def config_path() -> Path:
    if os.environ.get("SEGTRAIN_CONFIG"):
        return Path(os.environ["SEGTRAIN_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "segtrain" / "config.json"


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"current": None, "profiles": {}}
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read the profiles in {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict):
        raise ProfileError(f"{path} is not a segtrain config file (no \"profiles\" object)")
    return data


def load(name: str | None = None, *, path: Path | None = None) -> Profile | None:
    """The profile `name` (else $SEGTRAIN_PROFILE, else the current one); None when no profile is
    named and none is current. A profile named but missing is an error naming the file."""
    path = path or config_path()
    data = _read(path)
    wanted = name or os.environ.get("SEGTRAIN_PROFILE") or None
    chosen = wanted or data.get("current")
    profiles = data.get("profiles", {})
    assert isinstance(profiles, dict)
    if not chosen:
        return None
    if chosen not in profiles:
        if wanted is None:
            return None  # the current one was removed by hand: as if none were set
        raise ProfileError(f"no profile {chosen!r} in {path} (it has {sorted(profiles) or 'none'}): "
                           "`segtrain login --profile NAME ...` writes one")
    return Profile.from_dict(profiles[chosen])


def save(name: str, profile: Profile, *, current: bool = True, path: Path | None = None) -> Path:
    """Writes `profile` under `name` (and makes it current), keeping the others; returns the file."""
    path = path or config_path()
    data = _read(path)
    profiles = data.setdefault("profiles", {})
    assert isinstance(profiles, dict)
    profiles[name] = asdict(profile)
    if current or not data.get("current"):
        data["current"] = name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:  # mkstemp made it 0600
            json.dump(data, out, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
