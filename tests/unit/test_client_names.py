"""clients.names: the clients' one copy of resource-name formatting and parsing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from segtrain.common.v1 import common_pb2

from clients import names


@pytest.mark.parametrize(("make", "collection"), [
    (names.pipeline, "pipelines"), (names.training_set, "trainingSets"), (names.job, "jobs"),
    (names.model, "models"), (names.trainer_node, "trainerNodes"),
])
def test_a_bare_id_or_a_full_name_gives_the_full_name(make: Callable[[str], str], collection: str) -> None:
    assert make("x-1") == f"{collection}/x-1"
    assert make(f"{collection}/x-1") == f"{collection}/x-1"


def test_an_unset_reference_stays_unset() -> None:
    assert names.model("") == ""
    assert names.job("") == ""


def test_a_name_of_another_collection_is_passed_on_for_the_service_to_refuse() -> None:
    assert names.job("models/m-1") == "jobs/models/m-1"


@pytest.mark.parametrize(("value", "expected"), [
    ("jobs/j-3f9c", "j-3f9c"), ("j-3f9c", "j-3f9c"), ("trainingSets/cells", "cells"), ("", ""),
])
def test_resource_id(value: str, expected: str) -> None:
    assert names.resource_id(value) == expected


def test_resource_id_inverts_formatting() -> None:
    assert names.resource_id(names.training_set("cells")) == "cells"


def test_defaults() -> None:
    assert names.DEFAULT_PIPELINE == "segmentation"
    assert names.pipeline(names.DEFAULT_PIPELINE) == "pipelines/segmentation"
    assert {common_pb2.JobState.Name(s) for s in names.TERMINAL} == {  # type: ignore[arg-type]
        "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


def test_the_client_copies_match_the_services_owners() -> None:
    """Clients may not import service code, so they hold one copy each; it must not drift."""
    from clients.cli import main
    from services.common import job_states
    from services.common import names as owner
    from services.pipeline_svc.resources import pipelines

    for collection in ("PIPELINES", "TRAINING_SETS", "JOBS", "MODELS", "TRAINER_NODES"):
        assert getattr(names, collection) == getattr(owner, collection)

    assert names.TERMINAL == job_states.TERMINAL and main.TERMINAL is names.TERMINAL
    assert names.DEFAULT_PIPELINE == pipelines.DEFAULT_PIPELINE
    sets_create = main.build_parser().parse_args(["sets", "create", "s", "--tiles", "t", "--masks", "m"])
    assert sets_create.pipeline == names.DEFAULT_PIPELINE
