"""The local stack configures the services through their own settings classes: every SEGTRAIN_*
variable it sets is one a settings class reads, with the value it meant (so a renamed field can
never drift silently), and its tokens files are the services' format, private to their owner."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from clients.stack import NOT_FOR_NODES, LocalStack
from services.common.auth import Role, TokenStore
from services.common.settings import (
    MetricsSettings,
    PipelineSettings,
    SecuritySettings,
    ServerSettings,
    StorageSettings,
    TrainerSettings,
    environment,
    given,
)
from services.common.tokens import LISTED_ROLES, Principal, parse_node_key

EVERY_CLASS: tuple[type[BaseSettings], ...] = (
    StorageSettings, ServerSettings, SecuritySettings, PipelineSettings, MetricsSettings, TrainerSettings)


@pytest.fixture
def stack(tmp_path: Path) -> LocalStack:
    return LocalStack(tmp_path, s3_port=19000, metrics_port=15052, pipeline_port=15051)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SEGTRAIN_* variable from the shell running the tests."""
    import os

    for key in [k for k in os.environ if k.upper().startswith("SEGTRAIN_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def segtrain_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("SEGTRAIN_")}


def read_back(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[type[BaseSettings], BaseSettings]:
    """Each settings class as a service builds it from `env`."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {cls: cls() for cls in EVERY_CLASS}


def rendered_from_what_was_read(read: dict[type[BaseSettings], BaseSettings]) -> dict[str, str]:
    """The variables of the fields the services actually read from the environment."""
    return environment(*(given(cls, **{f: getattr(s, f) for f in s.model_fields_set}) for cls, s in read.items()))


def test_every_variable_the_stack_sets_is_read_by_the_services_with_its_value(
        stack: LocalStack, clean_env: pytest.MonkeyPatch) -> None:
    env = segtrain_vars(stack.env())
    read = read_back(clean_env, env)
    assert rendered_from_what_was_read(read) == env
    for meant in stack.settings():
        got = read[type(meant)]
        assert meant.model_fields_set, type(meant).__name__
        for field in meant.model_fields_set:
            assert getattr(got, field) == getattr(meant, field), f"{type(meant).__name__}.{field}"


def test_a_trainer_nodes_own_variables_are_read_too(stack: LocalStack, clean_env: pytest.MonkeyPatch) -> None:
    env = segtrain_vars(stack.trainer_env(2, 15099))
    read = read_back(clean_env, env)
    assert rendered_from_what_was_read(read) == env
    trainer = read[TrainerSettings]
    assert isinstance(trainer, TrainerSettings)
    assert (trainer.listen, trainer.node_id, trainer.pipeline_address) == (
        "127.0.0.1:15099", "local-2", stack.pipeline_address)
    # Its own token, which the pipeline service (holding the node key) knows as node local-2's;
    # never the service token or the node key.
    assert not NOT_FOR_NODES & set(env) and stack.tokens["service"] not in env.values()
    assert trainer.token is not None
    stack._write_tokens()
    pipeline_side = TokenStore.load(stack.tokens_file, parse_node_key(stack.node_key))
    assert pipeline_side.authenticate(trainer.token.get_secret_value()) == Principal("node local-2", Role.NODE,
                                                                                     "local-2")


def test_the_stack_configures_what_it_starts(stack: LocalStack, clean_env: pytest.MonkeyPatch) -> None:
    read = read_back(clean_env, segtrain_vars(stack.env()))
    storage, security = read[StorageSettings], read[SecuritySettings]
    assert isinstance(storage, StorageSettings) and isinstance(security, SecuritySettings)
    assert (storage.endpoint, storage.access_key, storage.secret_key.get_secret_value()) == (
        stack.s3_endpoint, stack.access_key, stack.secret_key)
    assert security.auth_tokens_file == stack.tokens_file
    assert security.service_token == SecretStr(stack.tokens["service"])
    pipeline, metrics = read[PipelineSettings], read[MetricsSettings]
    assert isinstance(pipeline, PipelineSettings) and isinstance(metrics, MetricsSettings)
    assert (pipeline.listen, pipeline.metrics_address, metrics.listen) == (
        stack.pipeline_address, stack.metrics_address, stack.metrics_address)
    assert pipeline.database_url != metrics.database_url
    assert str(stack.root) in pipeline.database_url and str(stack.root) in metrics.database_url


def test_the_shells_segtrain_variables_never_reach_the_stack(stack: LocalStack, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SEGTRAIN_S3_BUCKET", "from-the-shell")
    clean_env.setenv("SEGTRAIN_TLS_CERT_FILE", "/from/the/shell.pem")
    clean_env.setenv("SEGTRAIN_PIPELINE_LISTEN", "0.0.0.0:1")
    env = stack.env()
    assert not any("from-the-shell" in v or "/from/the/shell.pem" in v for v in env.values())
    assert "SEGTRAIN_S3_BUCKET" not in env and "SEGTRAIN_TLS_CERT_FILE" not in env
    assert env["SEGTRAIN_PIPELINE_LISTEN"] == stack.pipeline_address


def test_env_overrides_win(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, env_overrides={"SEGTRAIN_PIPELINE_LISTEN": "127.0.0.1:1", "SEGTRAIN_X": "y"})
    env = stack.env()
    assert (env["SEGTRAIN_PIPELINE_LISTEN"], env["SEGTRAIN_X"], env["HF_HUB_OFFLINE"]) == ("127.0.0.1:1", "y", "1")


# environment() and given()

def test_environment_renders_only_the_given_fields(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SEGTRAIN_S3_BUCKET", "from-the-shell")
    settings = given(StorageSettings, endpoint="s3:9000")
    assert settings.bucket == "segtrain"  # the default, not the shell's
    assert environment(settings) == {"SEGTRAIN_S3_ENDPOINT": "s3:9000"}


def test_environment_renders_each_type_as_the_services_read_it(clean_env: pytest.MonkeyPatch) -> None:
    settings = (
        given(StorageSettings, secret_key="s3cret", secure=True),
        given(SecuritySettings, auth_tokens_file=Path("/a/tokens.json"), service_token=None, allow_plaintext=False),
        given(TrainerSettings, capacity=3, progress_interval_s=0.5, num_threads=None),
    )
    env = environment(*settings)
    assert env == {
        "SEGTRAIN_S3_SECRET_KEY": "s3cret", "SEGTRAIN_S3_SECURE": "true",
        "SEGTRAIN_AUTH_TOKENS_FILE": "/a/tokens.json", "SEGTRAIN_ALLOW_PLAINTEXT": "false",
        "SEGTRAIN_TRAINER_CAPACITY": "3", "SEGTRAIN_TRAINER_PROGRESS_INTERVAL_S": "0.5",
    }
    read = read_back(clean_env, env)
    for meant in settings:
        for field in meant.model_fields_set:
            assert getattr(read[type(meant)], field) == getattr(meant, field), field


def test_given_validates_like_the_environment() -> None:
    with pytest.raises(ValidationError):
        given(StorageSettings, endpiont="s3:9000")  # a misspelt (or renamed) field
    with pytest.raises(ValidationError):
        given(StorageSettings, secure="maybe")
    assert isinstance(given(StorageSettings, secret_key="k").secret_key, SecretStr)


def test_one_variable_rendered_two_ways_is_an_error() -> None:
    assert environment(given(TrainerSettings, capacity=2), given(TrainerSettings, capacity=2)) == {
        "SEGTRAIN_TRAINER_CAPACITY": "2"}
    with pytest.raises(ValueError, match="SEGTRAIN_TRAINER_CAPACITY"):
        environment(given(TrainerSettings, capacity=2), given(TrainerSettings, capacity=3))


# Tokens

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tokens_are_the_services_format_and_private(stack: LocalStack) -> None:
    stack.credentials_file.parent.mkdir(parents=True)
    stack.credentials_file.write_text("{}")
    stack.credentials_file.chmod(0o644)  # a world-readable leftover is narrowed
    stack.credentials_file.parent.chmod(0o755)  # and so is a world-readable folder
    stack._write_tokens()
    assert mode(stack.credentials_file) == 0o600 and mode(stack.credentials_file.parent) == 0o700
    assert mode(stack.tokens_file) == 0o644  # digests only, for services running as other users
    assert [p.name for p in stack.credentials_file.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert json.loads(stack.credentials_file.read_text()) == stack.tokens
    assert set(stack.tokens) == {role.name.lower() for role in LISTED_ROLES}
    store = TokenStore.load(stack.tokens_file)
    for role in LISTED_ROLES:
        principal = store.authenticate(stack.tokens[role.name.lower()])
        assert principal is not None and principal.role is role
    assert store.authenticate("not-a-token") is None
    assert all(token not in stack.tokens_file.read_text() for token in stack.tokens.values())
