"""Connection profiles (clients/profiles.py) and how the SDK picks each connection field: the
argument, else the environment, else the profile, else the default; a profile's token goes only to
its own address unless the profile is named."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from clients import profiles
from clients.profiles import Profile, ProfileError
from clients.sdk import Client, Tls


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "segtrain" / "config.json"
    monkeypatch.setenv("SEGTRAIN_CONFIG", str(path))
    for variable in ("SEGTRAIN_PROFILE", "SEGTRAIN_ADDRESS", "SEGTRAIN_TOKEN", "SEGTRAIN_TLS", "SEGTRAIN_TLS_CA_FILE"):
        monkeypatch.delenv(variable, raising=False)
    return path


def connection(**kwargs: object) -> tuple[str, str, Tls | None]:
    with Client(**kwargs) as client:  # type: ignore[arg-type]
        return client.address, client._token, client._tls


def test_profiles_are_kept_private_and_the_last_saved_is_current(config: Path) -> None:
    profiles.save("local", Profile(address="127.0.0.1:1", token="t-local"))
    profiles.save("prod", Profile(address="10.0.0.5:50051", token="t-prod", tls_ca_file="/ca.pem"))
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert json.loads(config.read_text())["current"] == "prod"
    assert profiles.load() == Profile(address="10.0.0.5:50051", token="t-prod", tls_ca_file="/ca.pem")
    assert profiles.load("local") == Profile(address="127.0.0.1:1", token="t-local")
    assert [p.name for p in config.parent.iterdir()] == ["config.json"], "no temporary file left"


def test_no_file_or_no_current_profile_means_none(config: Path) -> None:
    assert profiles.load() is None
    assert connection() == ("127.0.0.1:50051", "", None)


def test_a_named_profile_that_is_missing_is_an_error_naming_the_file(config: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    profiles.save("local", Profile(address="127.0.0.1:1"))
    with pytest.raises(ProfileError, match=r"no profile 'nope' in .*config.json \(it has \['local'\]\)"):
        profiles.load("nope")
    monkeypatch.setenv("SEGTRAIN_PROFILE", "nope")
    with pytest.raises(ProfileError, match="no profile 'nope'"):
        Client()
    config.write_text(json.dumps(["a list"]))
    with pytest.raises(ProfileError, match="not a segtrain config file"):
        profiles.load()


def test_the_profile_fills_what_neither_argument_nor_environment_gives(config: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    profiles.save("local", Profile(address="127.0.0.1:1", token="t-local"))
    assert connection() == ("127.0.0.1:1", "t-local", None)
    assert connection(token="t-arg")[:2] == ("127.0.0.1:1", "t-arg")
    monkeypatch.setenv("SEGTRAIN_TOKEN", "t-env")
    assert connection()[:2] == ("127.0.0.1:1", "t-env")
    monkeypatch.setenv("SEGTRAIN_ADDRESS", "127.0.0.1:1")  # the profile's own address: still its profile
    assert connection()[:2] == ("127.0.0.1:1", "t-env")


def test_a_profiles_token_never_goes_to_another_address_unless_the_profile_is_named(config: Path) -> None:
    profiles.save("local", Profile(address="127.0.0.1:1", token="t-local", tls=True))
    assert connection(address="127.0.0.2:2") == ("127.0.0.2:2", "", None)
    address, token, tls = connection(address="127.0.0.2:2", profile="local")
    assert (address, token, tls) == ("127.0.0.2:2", "t-local", Tls())


def test_a_profiles_tls_files_are_used(config: Path, tmp_path: Path) -> None:
    profiles.save("secure", Profile(address="127.0.0.1:1", token="t", tls_ca_file=str(tmp_path / "ca.pem")))
    (tmp_path / "ca.pem").write_text("a CA file")
    assert connection()[2] == Tls(ca_file=tmp_path / "ca.pem")
