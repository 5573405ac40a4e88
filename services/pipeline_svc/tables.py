"""The pipeline service's tables. JSON columns hold small lists/dicts that are always read whole."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import JSON, BigInteger, Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.migrations import Schema
from services.common.timeutil import utcnow


class PipelineRow(SQLModel, table=True):
    __tablename__ = "pipelines"

    id: str = Field(primary_key=True, max_length=63)
    display_name: str
    type: int
    class_names: list[str] = Field(sa_column=Column(JSON, nullable=False))
    tile_size: int
    # Serialized segtrain.common.v1.Hyperparameters: the fields the pipeline's creator set.
    default_hyperparameters: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    description: str = ""
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    create_time: datetime = Field(default_factory=utcnow)


class TrainingSetRow(SQLModel, table=True):
    __tablename__ = "training_sets"

    id: str = Field(primary_key=True, max_length=63)
    display_name: str
    pipeline: str = Field(index=True)
    class_names: list[str] = Field(sa_column=Column(JSON, nullable=False))
    # segtrain.pipeline.v1.TrainingSet.State; PREPARING until every tile is checked and stored.
    # (Sets made before preparation was asynchronous were READY when created: the default.)
    state: int = Field(default=2, index=True, sa_column_kwargs={"server_default": "2"})
    # The request it is prepared from (domain.TrainingSetSpec as JSON) and that content's digest:
    # a repeated request names the same set, another one with the same id is a conflict.
    spec: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False, server_default=""))
    spec_hash: str = Field(default="", max_length=80, sa_column_kwargs={"server_default": ""})
    tiles_checked: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    failure_reason: str = Field(default="", sa_column_kwargs={"server_default": ""})
    snapshot: str = Field(default="", index=True, max_length=80)  # "" until READY
    tile_count: int  # requested (PREPARING, FAILED) or stored (READY)
    train_tile_count: int = 0
    validation_tile_count: int = 0
    validation_fraction: float
    split_seed: int
    # Serialized segtrain.pipeline.v1.ValidationReport (empty until READY or FAILED).
    report: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    # The principal that created it (empty: made without authentication, or before owners were kept).
    owner: str = Field(default="", max_length=1024, index=True, sa_column_kwargs={"server_default": ""})
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    create_time: datetime = Field(default_factory=utcnow)
    update_time: datetime | None = Field(default_factory=utcnow, nullable=True)


class TileRow(SQLModel, table=True):
    __tablename__ = "tiles"
    __table_args__ = (UniqueConstraint("training_set", "name", name="uq_tile_name"),)

    id: int | None = Field(default=None, primary_key=True)
    training_set: str = Field(foreign_key="training_sets.id", index=True)
    name: str
    image_uri: str
    mask_uri: str
    source_image: str
    width: int
    height: int
    validation: bool
    # A serialized segtrain.trainer.v1.TileMeasures, from the set's preparation (None for tiles
    # prepared before measures were recorded).
    measures: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class JobRow(SQLModel, table=True):
    """A training job, or an analysis job (`kind`; its inputs and results in AnalysisRow): both
    share the state machine, scheduling, attempts, relay and event log."""

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=63)
    kind: str = Field(default="training", max_length=16, index=True, sa_column_kwargs={"server_default": "training"})
    display_name: str = ""
    pipeline: str = Field(index=True)
    training_set: str
    from_model: str = ""
    pretrained_weights: str = ""
    # Serialized effective segtrain.common.v1.Hyperparameters.
    hyperparameters: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: int = Field(index=True)
    failure_reason: str = ""
    attempt: int = 0
    # Serialized segtrain.common.v1.Progress / EpochMetrics (latest).
    progress: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    latest_metrics: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    trainer_node: str = ""
    # Data-parallel processes per node and nodes (segtrain.common.v1.Parallelism, all set).
    processes: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    nodes: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    # Every node of the current attempt in rank order (trainer_node, rank 0, first); empty while
    # no attempt holds nodes.
    gang_nodes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    # Highest trainer source_seq of the current attempt already relayed to the metrics service.
    relayed_source_seq: int = 0
    # The pipeline replica whose relay follows the job, and until when (runtime/scheduler.py):
    # renewed by the owner, taken over by another replica once it has lapsed.
    relay_owner: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    relay_lease_until: datetime | None = None
    # Counter of the pipeline service's own events (attempt 0) for this job.
    control_seq: int = 0
    # Latest full-state checkpoint of any attempt; a re-queued job resumes from it.
    checkpoint_uri: str = ""
    # Its epoch as relayed (the file can be advanced later by an attempt that outlived its lease).
    checkpoint_epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    cancel_requested: bool = False
    stop_early: bool = False
    model: str = ""
    # Why hyperparameters.normalization is what it is (what "auto" chose, or that it was asked for).
    normalization_reason: str = Field(default="", sa_column_kwargs={"server_default": ""})
    # segcore.advice quality issues of the registered model, as [{"code", "class_name", "message"}].
    quality_warnings: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    # The principal that created it (empty: made without authentication, or before owners were kept).
    owner: str = Field(default="", max_length=1024, index=True, sa_column_kwargs={"server_default": ""})
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    create_time: datetime = Field(default_factory=utcnow)
    start_time: datetime | None = None
    end_time: datetime | None = None
    update_time: datetime = Field(default_factory=utcnow)


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    id: str = Field(primary_key=True, max_length=63)
    job: str = Field(unique=True)
    pipeline: str = Field(index=True)
    training_set: str
    training_set_snapshot: str
    architecture: str
    class_names: list[str] = Field(sa_column=Column(JSON, nullable=False))
    tile_size: int
    # Serialized segtrain.common.v1.JobFinished the model was registered from.
    finished: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # The principal that created it (its job's owner).
    owner: str = Field(default="", max_length=1024, index=True, sa_column_kwargs={"server_default": ""})
    # Hex SHA-256 of the registered weights, checked by a node before it loads them.
    weights_sha256: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    parent_model: str = ""
    create_time: datetime = Field(default_factory=utcnow)


class AnalysisRow(SQLModel, table=True):
    """What an analysis job analyses and what it produced (its life is its JobRow's, same id)."""

    __tablename__ = "analyses"

    id: str = Field(primary_key=True, foreign_key="jobs.id", max_length=63)
    model: str = Field(index=True)
    training_set: str = ""  # the set whose tiles it analyses, if any
    tile_count: int
    # Object key of the inputs (JSON lines {"tile", "image"}), written when it was created.
    inputs_uri: str
    # Serialized segtrain.common.v1.AnalysisOutput of the attempt that succeeded (empty until then).
    output: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))


class TrainerNodeRow(SQLModel, table=True):
    __tablename__ = "trainer_nodes"

    id: str = Field(primary_key=True, max_length=63)
    address: str
    capacity: int = 1
    device: str = ""
    # What one job may use there (admission): bytes of memory (0: unknown), processes.
    job_memory_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    max_processes: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    state: int
    heartbeat_time: datetime = Field(default_factory=utcnow)


class OutboxRow(SQLModel, table=True):
    """Events of the pipeline service waiting to be appended to the metrics service's log.

    Written in the same transaction as the state change they describe, so a crash or a metrics
    outage never loses one; the relay deletes a row once the metrics service has it."""

    __tablename__ = "event_outbox"

    id: int | None = Field(default=None, primary_key=True)
    job: str = Field(index=True)
    # Serialized segtrain.common.v1.JobEvent (attempt 0, source_seq from JobRow.control_seq).
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # Set when the metrics service refused the row for good: it is kept for a person, not retried.
    parked: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})
    park_reason: str = Field(default="", sa_column_kwargs={"server_default": ""})
    # Not an event: the job was deleted, and the metrics service is to delete its whole log
    # (DeleteJobEvents; the payload is empty).
    forget_log: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})


TABLES = [PipelineRow, TrainingSetRow, TileRow, JobRow, ModelRow, AnalysisRow, TrainerNodeRow, OutboxRow]
# The tables and their migrations (services/common/migrations.py).
SCHEMA = Schema("pipeline", TABLES, Path(__file__).parent / "migrations")
