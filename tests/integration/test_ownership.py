"""Ownership and quotas through real gRPC, with authentication on: what a trainer creates records
it as its owner; a trainer starts, stops and cancels only its own jobs (an admin any); lists
filter by owner; and a principal's queued and running jobs are held to its quota, even when it
starts many at once."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from services.common.settings import SecuritySettings, StorageSettings
from services.common.tokens import Role, write_tokens_file
from tests.helpers import NODE_KEY, error_of
from tests.integration.conftest import MetricsServer, PipelineServer, serving_pipeline

S = common_pb2
QUOTA = 2
PRINCIPALS = {"alice": Role.TRAINER, "bob": Role.TRAINER, "root": Role.ADMIN, "eve": Role.VIEWER,
              "services": Role.SERVICE}


def token(name: str) -> str:
    return f"token-of-{name}-0123456789"


@pytest.fixture
def pipeline_server(tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer
                    ) -> Iterator[PipelineServer]:
    """The pipeline service with authentication on and a quota of QUOTA (overrides conftest's)."""
    tokens_file = tmp_path / "tokens.json"
    write_tokens_file(tokens_file, {token(name): (name, role) for name, role in PRINCIPALS.items()})
    security = SecuritySettings(auth_tokens_file=tokens_file, service_token=SecretStr(token("services")),
                                node_key=SecretStr(NODE_KEY))
    with serving_pipeline(tmp_path, s3_settings, metrics_server, security,
                          max_active_jobs_per_principal=QUOTA) as running:
        yield running


@pytest.fixture
def client(pipeline_server: PipelineServer) -> Client:
    """Alice's client: she makes the training set (conftest's training_set fixture)."""
    return Client(pipeline_server.address, token=token("alice"))


@pytest.fixture
def as_(pipeline_server: PipelineServer) -> Iterator[dict[str, Client]]:
    clients = {name: Client(pipeline_server.address, token=token(name)) for name in PRINCIPALS}
    yield clients
    for c in clients.values():
        c.close()


def new_job(c: Client, training_set: pb.TrainingSet) -> pb.Job:
    # No node is registered: a started job stays QUEUED, which counts against its owner's quota.
    return c.create_job(pipeline="segmentation", training_set=training_set.name,
                        hyperparameters=S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1))


def test_a_trainer_acts_on_its_own_jobs_only_and_an_admin_on_any(
        training_set: pb.TrainingSet, as_: dict[str, Client]) -> None:
    assert training_set.owner == "alice"
    job = new_job(as_["alice"], training_set)
    assert job.owner == "alice"
    for action in (lambda: as_["bob"].start_job(job.name), lambda: as_["bob"].cancel_job(job.name),
                   lambda: as_["bob"].cancel_job(job.name, stop_early=True)):
        refused = error_of(action)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "belongs to alice" in refused.details() and job.name in refused.details()
    assert as_["bob"].get_job(job.name).state == S.JOB_STATE_PENDING  # nothing changed
    assert error_of(as_["eve"].cancel_job, job.name).code() == grpc.StatusCode.PERMISSION_DENIED  # role first
    assert as_["alice"].start_job(job.name).state == S.JOB_STATE_QUEUED
    assert as_["root"].cancel_job(job.name).state == S.JOB_STATE_CANCELLED  # an admin may
    # Deleting (now that it has ended) is the owner's or an admin's too.
    refused = error_of(as_["bob"].delete_job, job.name)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to alice" in refused.details()
    assert error_of(as_["bob"].delete_training_set, training_set.name).code() == grpc.StatusCode.PERMISSION_DENIED
    as_["alice"].delete_job(job.name)
    assert error_of(as_["eve"].get_job, job.name).code() == grpc.StatusCode.NOT_FOUND
    as_["root"].delete_training_set(training_set.name)


def test_lists_filter_by_owner(training_set: pb.TrainingSet, as_: dict[str, Client]) -> None:
    mine = {new_job(as_["alice"], training_set).name for _ in range(2)}
    theirs = {new_job(as_["bob"], training_set).name}
    assert {j.name for j in as_["eve"].list_jobs(owner="alice")} == mine
    assert {j.name for j in as_["eve"].list_jobs(owner="bob")} == theirs
    assert {j.name for j in as_["eve"].list_jobs()} == mine | theirs
    assert as_["eve"].list_jobs(owner="nobody") == []
    assert [s.name for s in as_["eve"].list_training_sets(owner="alice")] == [training_set.name]
    assert as_["eve"].list_training_sets(owner="bob") == []


def test_a_principal_is_held_to_its_quota_of_queued_and_running_jobs(
        training_set: pb.TrainingSet, as_: dict[str, Client]) -> None:
    jobs = [new_job(as_["alice"], training_set) for _ in range(QUOTA + 1)]
    for job in jobs[:QUOTA]:
        as_["alice"].start_job(job.name)
    refused = error_of(as_["alice"].start_job, jobs[QUOTA].name)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_active_jobs_per_principal" in refused.details()
    status = rpc_status.from_call(refused)
    assert status is not None
    failure = error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(failure)
    assert failure.violations[0].subject == "principal:alice"
    assert as_["alice"].get_job(jobs[QUOTA].name).state == S.JOB_STATE_PENDING  # refused, unchanged
    # The quota is per principal: bob's job starts.
    assert as_["bob"].start_job(new_job(as_["bob"], training_set).name).state == S.JOB_STATE_QUEUED
    # When one of alice's ends, the next may start.
    as_["alice"].cancel_job(jobs[0].name)
    assert as_["alice"].start_job(jobs[QUOTA].name).state == S.JOB_STATE_QUEUED


def test_starting_many_at_once_never_exceeds_the_quota(training_set: pb.TrainingSet, as_: dict[str, Client]) -> None:
    jobs = [new_job(as_["alice"], training_set) for _ in range(4 * QUOTA)]

    def start(job: pb.Job) -> grpc.StatusCode:
        try:
            as_["alice"].start_job(job.name)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()
    with ThreadPoolExecutor(len(jobs)) as pool:
        codes = list(pool.map(start, jobs))
    assert codes.count(grpc.StatusCode.OK) == QUOTA, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(jobs) - QUOTA, codes
    queued = [j for j in as_["alice"].list_jobs(owner="alice") if j.state == S.JOB_STATE_QUEUED]
    assert len(queued) == QUOTA
