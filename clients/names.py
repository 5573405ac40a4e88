"""Resource names on the client side ("pipelines/{id}", "jobs/{id}", ...): the one place in
clients that formats and parses them, plus the client's defaults that are names or states.

The services own the names (services.common.names validates them); clients may import only the
generated API, so this is the clients' one copy. Every argument accepts a bare id or a full name.
"""

from __future__ import annotations

from segtrain.common.v1 import common_pb2

PIPELINES = "pipelines"
TRAINING_SETS = "trainingSets"
JOBS = "jobs"
ANALYSES = "analyses"
MODELS = "models"
TRAINER_NODES = "trainerNodes"

# The pipeline a training set belongs to unless another is named.
DEFAULT_PIPELINE = "segmentation"
# Job states after which nothing more happens to a job.
TERMINAL = frozenset({common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED})


def state_name(state: int) -> str:
    """"SUCCEEDED" for JOB_STATE_SUCCEEDED."""
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def name(collection: str, id_or_name: str) -> str:
    """`collection/{id}` for a bare id; a name in `collection` unchanged; "" (an unset reference)
    stays "". Anything else is passed on for the service to refuse."""
    if not id_or_name or id_or_name.startswith(f"{collection}/"):
        return id_or_name
    return f"{collection}/{id_or_name}"


def resource_id(id_or_name: str) -> str:
    """The id of a name ("jobs/j-1" -> "j-1"); a bare id unchanged."""
    return id_or_name.rpartition("/")[2]


def pipeline(id_or_name: str) -> str:
    return name(PIPELINES, id_or_name)


def training_set(id_or_name: str) -> str:
    return name(TRAINING_SETS, id_or_name)


def job(id_or_name: str) -> str:
    return name(JOBS, id_or_name)


def analysis(id_or_name: str) -> str:
    return name(ANALYSES, id_or_name)


def run(id_or_name: str) -> str:
    """What has an event log: an analysis job's name as it is, else a training job's."""
    return id_or_name if id_or_name.startswith(f"{ANALYSES}/") else job(id_or_name)


def model(id_or_name: str) -> str:
    return name(MODELS, id_or_name)


def trainer_node(id_or_name: str) -> str:
    return name(TRAINER_NODES, id_or_name)
