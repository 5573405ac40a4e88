"""Settings of every service, read once at start-up from SEGTRAIN_* environment variables.

Each service builds its own settings object in its composition root (`__main__`) and passes it
down; nothing else reads the environment. The README's configuration table lists every variable.
The other direction, settings to variables, is `environment` (the local stack launcher configures
the services with it): a variable's name is its class's env_prefix plus the field name, upper case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.logs import LogFormat
from services.common.tokens import parse_node_key

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

DEFAULT_PIPELINE_ADDRESS = "127.0.0.1:50051"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:50052"
DEFAULT_TRAINER_ADDRESS = "127.0.0.1:50053"
DEFAULT_S3_ENDPOINT = "127.0.0.1:9000"


def default_data_dir() -> Path:
    return Path.cwd() / ".segtrain"


class StorageSettings(BaseSettings):
    """Object storage (MinIO or any S3 API server)."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_S3_")

    endpoint: str = DEFAULT_S3_ENDPOINT
    access_key: str = "segtrain"
    secret_key: SecretStr = SecretStr("segtrain-dev-secret")
    secure: bool = False
    region: str = "us-east-1"
    bucket: str = "segtrain"
    # Endpoint clients use for presigned URLs when it differs from `endpoint` (e.g. in Docker).
    public_endpoint: str | None = None


class ServerSettings(BaseSettings):
    """What every gRPC server shares."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_")

    log_level: str = "INFO"
    # "text" lines, or "json": one object per line with the job and attempt (services/common/logs.py).
    log_format: LogFormat = "text"
    # Seconds to let in-flight RPCs finish on SIGTERM.
    shutdown_grace_s: float = 10.0
    # host:port of this process's Prometheus /metrics over HTTP (port 0: one the kernel picks);
    # unset: not served (services/common/observability.py).
    prometheus_listen: str | None = None


class ServingSettings(BaseSettings):
    """What one asyncio server admits at once (services.common.gate), and reflection."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_")

    # Unary calls in flight; a full server answers RESOURCE_EXHAUSTED at once.
    max_calls: int = Field(default=64, ge=1)
    # Further calls only the reserved methods (node heartbeats, event appends) may use.
    reserved_calls: int = Field(default=32, ge=1)
    # Of max_calls, how many the long methods (AnalyzeTiles: up to 600 s) may hold at once, so
    # that long calls, abandoned ones included, never take the capacity short calls need.
    max_long_calls: int = Field(default=8, ge=1)
    # Open streams (watches) per authenticated principal.
    max_streams_per_principal: int = Field(default=4096, ge=1)
    # Open streams without a token (health Watch, reflection) per client host.
    max_open_streams_per_peer: int = Field(default=32, ge=1)
    # Threads for blocking work (SQL, object storage): everyone's, and the reserved methods' own.
    blocking_threads: int = Field(default=16, ge=1)
    reserved_threads: int = Field(default=4, ge=1)
    # Calls the gRPC transport holds until the server's event loop takes them (a burst of new
    # streams). Past it, gRPC cancels new calls at random (CANCELLED before the server sees them),
    # all of them at twice it. gRPC's default, 1000, cancelled ~10 % of 2,000 watches opened at once.
    max_pending_calls: int = Field(default=10_000, ge=1)
    # Server reflection: "auto" serves it on loopback addresses only.
    reflection: Literal["auto", "on", "off"] = "auto"


class SecuritySettings(BaseSettings):
    """Authentication and transport security, shared by every service."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_")

    # JSON file of token digests with names and roles (see services/common/auth.py). Unset disables
    # authentication, which is allowed only on a loopback listen address.
    auth_tokens_file: Path | None = None
    # Token (role "service") the pipeline and metrics services present when they call each other.
    service_token: SecretStr | None = None
    # The node key, hex (pipeline service only): trainer nodes' tokens are derived from it and their
    # node ids (services/common/tokens.py; `scripts/make_tokens.py` makes one). Required with
    # authentication: without it no node could register.
    node_key: SecretStr | None = None

    def node_key_bytes(self) -> bytes | None:
        return parse_node_key(self.node_key.get_secret_value()) if self.node_key is not None else None
    # Server certificate and key (PEM) for TLS; unset serves plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # CA bundle (PEM): verifies the services this one calls and, with tls_client_auth, its callers.
    tls_ca_file: Path | None = None
    # Require client certificates signed by tls_ca_file (mutual TLS between services).
    tls_client_auth: bool = False
    # Allow plaintext on a non-loopback address (e.g. inside a private container network).
    allow_plaintext: bool = False


class PipelineSettings(BaseSettings):
    """The pipeline service (control plane)."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_PIPELINE_")

    listen: str = DEFAULT_PIPELINE_ADDRESS
    database_url: str = Field(default_factory=lambda: f"sqlite:///{default_data_dir() / 'pipeline.db'}")
    # What to do with a database whose schema is behind this version (services/common/migrations.py):
    # "auto" creates an empty one's schema and refuses one that is behind; "true" migrates any;
    # "false" changes nothing (only a database at the head is served).
    database_migrate: Literal["auto", "true", "false"] = "auto"
    # Metrics service, for relaying job events; also advertised to clients by GetServiceInfo.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_public_address: str | None = None
    # Seconds between scheduler passes (it also wakes on every start and registration).
    schedule_interval_s: float = 2.0
    # Seconds between node heartbeats; a node missing 3 in a row is marked lost.
    heartbeat_interval_s: float = 5.0
    # Attempts a job gets (re-queues after lost nodes included) before it fails.
    max_attempts: int = 5
    # Seconds a replica holds a job's relay lease without renewing it (each scheduler pass renews);
    # when its replica dies, another takes the job's relay over after at most this long.
    relay_lease_s: float = Field(default=10.0, gt=0)
    # This replica's name in the relay leases it holds (`jobs.relay_owner`) and its logs, e.g. a
    # pod's name; unset: a random one per process. Two live replicas must never share one.
    replica_id: str | None = Field(default=None, min_length=1, max_length=64)
    # Training sets prepared at once, and tiles of each decoded and stored at once.
    prepare_concurrency: int = Field(default=2, ge=1, le=64)
    prepare_threads: int = Field(default=8, ge=1, le=64)
    # MB the tiles being prepared (all sets together) may hold at once: their files, decoded
    # pixels and masks, reserved at the most a tile of the pipeline's size can take.
    prepare_memory_mb: int = Field(default=1024, ge=16)
    # Jobs and analyses one principal may have queued or running at once (0: no limit); past it,
    # StartJob and CreateAnalysisJob answer RESOURCE_EXHAUSTED naming the quota.
    max_active_jobs_per_principal: int = Field(default=64, ge=0)
    # The storage collector: seconds between its passes; uploads nothing will read are deleted once
    # this old (0: never); objects no row owns once this old (a grace for work in progress).
    collect_interval_s: float = Field(default=3600.0, gt=0)
    upload_ttl_s: float = Field(default=7 * 86400.0, ge=0)
    orphan_grace_s: float = Field(default=86400.0, ge=60)


class MetricsSettings(BaseSettings):
    """The metrics service."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_METRICS_")

    listen: str = DEFAULT_METRICS_ADDRESS
    database_url: str = Field(default_factory=lambda: f"sqlite:///{default_data_dir() / 'metrics.db'}")
    # What to do with a database whose schema is behind this version (services/common/migrations.py):
    # "auto" creates an empty one's schema and refuses one that is behind; "true" migrates any;
    # "false" changes nothing (only a database at the head is served).
    database_migrate: Literal["auto", "true", "false"] = "auto"
    # Seconds of silence after which a watch stream gets a heartbeat.
    heartbeat_interval_s: float = 5.0
    # Events a slow watcher may lag behind before it is cut off (it can resume).
    watcher_buffer: int = 1000
    # Seconds a watch of a job with no events waits for its first one before NOT_FOUND (a job just
    # created has its first event on the way from the pipeline's outbox).
    unknown_job_grace_s: float = Field(default=2.0, ge=0.0)
    # Event-log retention (services/metrics_svc/retention.py): logs whose newest event is older
    # than this many days go whole (0: kept for ever); no log keeps more than this many events,
    # its oldest going first (0: no cap); seconds between passes.
    # With more than one replica: seconds between the reads that bring other replicas' new events
    # to this one's watchers (one read per watched job; 0: one replica, no reads).
    poll_interval_s: float = Field(default=0.0, ge=0.0)
    retention_days: float = Field(default=90.0, ge=0.0)
    max_events_per_job: int = Field(default=100_000, ge=0)
    retention_interval_s: float = Field(default=600.0, gt=0)


class TrainerSettings(BaseSettings):
    """A trainer node."""

    model_config = SettingsConfigDict(env_prefix="SEGTRAIN_TRAINER_")

    listen: str = DEFAULT_TRAINER_ADDRESS
    # Address the pipeline service reaches this node at (defaults to `listen`).
    advertise_address: str | None = None
    pipeline_address: str = DEFAULT_PIPELINE_ADDRESS
    node_id: str | None = None
    # This node's own token (derived from the node key and node_id: `scripts/make_tokens.py
    # --node ID`): it registers and heartbeats with it, and accepts only calls that carry it.
    # Unset: no authentication, allowed on a loopback listen address only.
    token: SecretStr | None = None
    # Jobs this node runs at once.
    capacity: int = 1
    # "auto" picks CUDA when available, else CPU.
    device: str = "auto"
    # Torch CPU threads; unset lets torch decide.
    num_threads: int | None = None
    # Seconds between batch-progress events of one job.
    progress_interval_s: float = 1.0
    # Seconds a job waits out an object-store outage (retrying with backoff) before it fails.
    storage_patience_s: float = 120.0
    # Processes that load and prepare tiles for each job's worker (0: the worker does it itself).
    data_workers: int = 2
    # MB of prepared tiles a job may keep in memory between epochs: a set whose prepared tiles fit
    # is prepared once; a larger one streams every epoch and keeps none.
    prepared_cache_mb: int = 256
    # Disk cache of tile objects shared by the node's jobs (unset: the system's temp folder), and
    # its budget in MB (0: no cache; every epoch reads the object store).
    tile_cache_dir: Path | None = None
    tile_cache_mb: int = 8192
    # Resident memory (MB) a job's worker process may use (0: no limit). Past it the attempt fails
    # as out of memory, saying what to change, instead of the kernel killing it.
    worker_memory_limit_mb: int = 0
    # Memory (MB) one job may use for its training processes, for admission (0: the host's memory
    # divided by capacity, less the node's own processes per job; on CUDA, one GPU's memory).
    job_memory_mb: int = 0
    # Seconds a data-parallel process waits in a collective (or for the rendezvous) before the
    # attempt fails as a lost process and is retried.
    process_group_timeout_s: float = 300.0
    # Folders `file:` pretrained weights may be read from, separated by ":" (empty: none; a job
    # naming any other path fails without saying whether it exists).
    pretrained_roots: str = ""
    # Whether `hf:` pretrained weights may be downloaded from the Hugging Face hub.
    allow_hub: bool = False


def given(cls: type[SettingsT], /, **values: Any) -> SettingsT:
    """Settings of exactly `values`, validated as the environment's would be (an unknown field or
    a bad value raises), reading no environment: the other fields keep their defaults and only the
    given ones count as set (`model_fields_set`), which is what `environment` renders."""
    settings = cls.__new__(cls)
    # BaseModel's __init__ validates `values` alone; BaseSettings' would merge in the environment.
    BaseModel.__init__(settings, **values)
    return settings


def environment(*settings: BaseSettings) -> dict[str, str]:
    """The environment variables that configure the explicitly set fields of `settings`: the
    inverse of reading them. SecretStr is unwrapped, Path and numbers become text, booleans
    "true"/"false"; a field set to None is left out (unset). Two objects rendering one variable
    differently raise ValueError."""
    env: dict[str, str] = {}
    for item in settings:
        prefix = item.model_config.get("env_prefix", "")
        for name in sorted(item.model_fields_set):
            field = type(item).model_fields[name]
            if field.alias or field.validation_alias:
                raise TypeError(f"{type(item).__name__}.{name}: aliased fields are not rendered")
            value = getattr(item, name)
            if value is None:
                continue
            variable, text = f"{prefix}{name}".upper(), _variable_text(value)
            if env.setdefault(variable, text) != text:
                raise ValueError(f"{variable} is rendered twice, with different values")
    return env


def _variable_text(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | Path):
        return str(value)
    raise TypeError(f"no environment rendering for {type(value).__name__}")
