"""Resource names ("pipelines/{id}", "jobs/{id}", ...): the one place that formats and parses
them. Nobody else splits names on '/'."""

from __future__ import annotations

import re
import uuid

from services.common.errors import InvalidArgumentError

_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

PIPELINES = "pipelines"
TRAINING_SETS = "trainingSets"
JOBS = "jobs"
ANALYSES = "analyses"
MODELS = "models"
TRAINER_NODES = "trainerNodes"


def is_valid_id(resource_id: str) -> bool:
    return bool(_ID.match(resource_id))


def new_id(prefix: str) -> str:
    """A fresh random id such as 'j-3f9c2a71b0d4'."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def format_name(collection: str, resource_id: str) -> str:
    return f"{collection}/{resource_id}"


def parse_name(name: str, collection: str, *, field: str = "name") -> str:
    """Returns the id of `collection/{id}`; a bare id is accepted too. INVALID_ARGUMENT otherwise."""
    if not name:
        raise InvalidArgumentError.of(field, f"required, e.g. '{collection}/my-id'")
    prefix, sep, resource_id = name.rpartition("/")
    if sep and prefix != collection:
        raise InvalidArgumentError.of(field, f"must look like '{collection}/{{id}}', got {name!r}")
    if not is_valid_id(resource_id):
        raise InvalidArgumentError.of(
            field, "id must be 1-63 lowercase letters, digits or '-', starting and ending alphanumeric"
        )
    return resource_id


def canonical(name: str, collection: str, *, field: str = "name") -> str:
    """`collection/{id}` for a name or a bare id (INVALID_ARGUMENT naming `field` otherwise)."""
    return format_name(collection, parse_name(name, collection, field=field))


def pipeline(pipeline_id: str) -> str:
    return format_name(PIPELINES, pipeline_id)


def training_set(set_id: str) -> str:
    return format_name(TRAINING_SETS, set_id)


def job(job_id: str) -> str:
    return format_name(JOBS, job_id)


def analysis(analysis_id: str) -> str:
    return format_name(ANALYSES, analysis_id)


def canonical_run(name: str, *, field: str = "name") -> str:
    """The name of something with an event log: a training job ("jobs/{id}") or an analysis job
    ("analyses/{id}"); a bare id is a training job's."""
    collection = ANALYSES if name.startswith(f"{ANALYSES}/") else JOBS
    return canonical(name, collection, field=field)


def model(model_id: str) -> str:
    return format_name(MODELS, model_id)


def trainer_node(node_id: str) -> str:
    return format_name(TRAINER_NODES, node_id)
