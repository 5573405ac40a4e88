"""The values the pipeline service's use cases take and return, apart from table rows.

The servicer parses API requests into these (converters.py) and turns them back into responses;
nothing below the servicer sees a request or response message of the pipeline API.
Hyperparameters travel as plain values by contract name (segcore.hyperparameters), only the
fields someone set. Pipeline types and job states are the API enums' numbers.

Rows keep some values in their wire form, serialized, and the resources build those stored
forms: hyperparameters, progress and events (segtrain.common.v1), and a training set's
validation report (segtrain.pipeline.v1.ValidationReport), which is stored as the report the API
returns. Those are storage formats, not requests or responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from segtrain.common.v1 import common_pb2

from services.pipeline_svc.tables import AnalysisRow, JobRow

Hyperparameters = Mapping[str, object]


@dataclass(frozen=True)
class PipelineSpec:
    pipeline_id: str
    display_name: str
    type: int
    class_names: list[str]
    tile_size: int
    description: str = ""
    default_hyperparameters: Hyperparameters = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class TileSpec:
    image_key: str
    annotation_key: str = ""
    source_image: str = ""


@dataclass(frozen=True)
class TrainingSetSpec:
    pipeline: str
    tiles: list[TileSpec]
    # segcore.annotations format name ("masks", "instance-masks", "coco", "geojson", "labeller").
    format: str = "masks"
    training_set_id: str = ""
    display_name: str = ""
    class_names: list[str] = field(default_factory=list)
    annotations_key: str = ""
    validation_fraction: float | None = None
    split_seed: int | None = None
    instance_class: int | None = None
    request_id: str = ""
    owner: str = ""  # the principal making the request (empty without authentication)


@dataclass(frozen=True)
class JobSpec:
    pipeline: str
    training_set: str
    hyperparameters: Hyperparameters = field(default_factory=dict)
    from_model: str = ""
    pretrained_weights: str = ""
    display_name: str = ""
    request_id: str = ""
    processes: int = 0  # 0: the default, 1
    nodes: int = 0
    owner: str = ""


@dataclass(frozen=True)
class UploadFile:
    file_name: str
    key: str
    url: str


@dataclass(frozen=True)
class UploadGrant:
    upload_id: str
    files: list[UploadFile]
    expire_time: datetime


@dataclass(frozen=True)
class NodeRegistration:
    node_id: str
    address: str
    capacity: int
    device: str = ""
    job_memory_bytes: int = 0
    max_processes: int = 0


@dataclass(frozen=True)
class NodeHeartbeat:
    name: str
    jobs: list[str]
    draining: bool


@dataclass(frozen=True)
class HeartbeatAnswer:
    known: bool
    stop_jobs: list[str]


@dataclass(frozen=True)
class AnalysedTile:
    image_key: str
    mask_uri: str
    mask_url: str
    width: int
    height: int
    # Pixels predicted per class index.
    class_pixels: list[int]


@dataclass(frozen=True)
class Analysis:
    analysis_id: str
    trainer_node: str
    class_names: list[str]
    tiles: list[AnalysedTile]


@dataclass(frozen=True)
class AnalysisJobSpec:
    model: str
    image_keys: list[str] = field(default_factory=list)
    training_set: str = ""
    pipeline: str = ""
    display_name: str = ""
    request_id: str = ""
    owner: str = ""


@dataclass(frozen=True)
class AnalysisJob:
    """An analysis job: its life (the job row) and what it analyses and produced."""

    job: JobRow
    analysis: AnalysisRow


@dataclass(frozen=True)
class ComparedJob:
    job: JobRow
    training_set_snapshot: str
    # The job's effective epochs, from the metrics service's history.
    epochs: list[common_pb2.EpochMetrics]


@dataclass(frozen=True)
class Difference:
    field: str
    values: list[str]


@dataclass(frozen=True)
class Drift:
    job: str
    epochs_compared: int
    identical: bool
    # Largest absolute difference per metric name ("train_loss", "val_iou", ...).
    largest: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    jobs: list[ComparedJob]
    differences: list[Difference]
    drift: list[Drift]
