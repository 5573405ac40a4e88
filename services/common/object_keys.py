"""The object-store layout: every prefix and key shape in the bucket, and the checks that a key
from a request or a peer lies where it should. No other module writes a key literal.

Keys a job attempt writes carry the attempt, so an attempt that outlives its assignment (a node
that was paused and resumes after the job was re-run elsewhere) can never overwrite what a later
attempt registered. `LAYOUT` is the table the README's "Object keys" section shows (a test keeps
the two identical).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from segtrain.common.v1 import common_pb2

from services.common.errors import InvalidArgumentError
from services.common.storage import safe_key

UPLOADS = "uploads/"
SNAPSHOTS = "training-sets/"
JOBS = "jobs/"
ANALYSES = "analyses/"
SCRATCH = "scratch/"

ModelKind = Literal["best", "final"]

# (key pattern, written by, what): the README's "Object keys" table.
LAYOUT: tuple[tuple[str, str, str], ...] = (
    (f"{UPLOADS}{{upload_id}}/{{file}}", "clients, via presigned PUTs from `CreateUpload`",
     "tiles and masks to turn into a training set; images to analyse; pretrained weights"),
    (f"{SNAPSHOTS}{{training_set}}/images/{{tile}}-{{sha256[:16]}}{{ext}}", "pipeline (set preparation)",
     "the set's tile images as uploaded; the content hash in the key means a key never names two contents"),
    (f"{SNAPSHOTS}{{training_set}}/masks/{{tile}}-{{sha256[:16]}}.png", "pipeline (set preparation)",
     "the checked class-index masks, re-encoded as PNG"),
    (f"{JOBS}{{job}}/attempts/{{attempt}}/tiles.pb", "pipeline (scheduler)",
     "the attempt's tiles with their split (a serialized `TileManifest`), named with its sha256 in `RunJob`: "
     "requests between the services never grow with the set"),
    (f"{JOBS}{{job}}/attempts/{{attempt}}/checkpoints/state-latest.pt", "trainer",
     "the attempt's rolling full-state checkpoint (weights, optimiser, scheduler, RNG state, best weights so "
     "far, history), overwritten every `checkpoint_every` epochs and after the last; the next attempt resumes "
     "from it. Deleted (with the tile manifests and other attempts' files) once the job has SUCCEEDED: only "
     "the model's two weights files stay; a FAILED or CANCELLED job keeps it"),
    (f"{JOBS}{{job}}/attempts/{{attempt}}/models/best.safetensors", "trainer",
     "the registered model: weights of the best epoch by validation IoU, with metadata (architecture, "
     "classes, normalisation, versions); its sha256 is recorded at registration and checked on every load"),
    (f"{JOBS}{{job}}/attempts/{{attempt}}/models/final.safetensors", "trainer", "weights after the last epoch"),
    (f"{JOBS}{{job}}/exports/{{format}}/{{file}}", "trainer (`ExportModel`)",
     "the model's export to a format other tools load (`hf`, `onnx`, `torchscript`), made at its first "
     "`ExportModel`: its files, then `manifest.json` (each file's size and sha256, the parity check), written "
     "last; deleted with the model"),
    (f"{ANALYSES}{{analysis_id}}/masks/{{stem}}.png", "trainer (`AnalyzeTiles`)", "predicted class-index masks"),
    (f"{ANALYSES}{{analysis}}/inputs.jsonl", "pipeline (`CreateAnalysisJob`)",
     "an analysis job's tiles in order, one JSON line each: `{\"tile\": name, \"image\": key}`"),
    (f"{ANALYSES}{{analysis}}/attempts/{{attempt}}/masks/{{tile}}.png", "trainer (analysis job)",
     "the predicted class-index mask of each tile"),
    (f"{ANALYSES}{{analysis}}/attempts/{{attempt}}/results/{{file}}", "trainer (analysis job)",
     "`manifest.json`, `tiles.csv`, `tiles.json`, `classes.csv`, `classes.json`, and the per-tile results in "
     "pages of 1000 tiles (`tiles-00000.json`, ...) that `ListAnalysisTiles` reads"),
    (f"{SCRATCH}{{name}}/…", "benchmarks (`bench/`)", "probe objects of a measurement, deleted when it ends"),
)


# Uploads -------------------------------------------------------------------------------------

def upload_key(upload_id: str, file_name: str, *, field: str) -> str:
    return safe_key(f"{UPLOADS}{upload_id}/{file_name}", field=field)


def check_upload_key(key: str, *, field: str) -> str:
    """`key` if it names an uploaded object; INVALID_ARGUMENT naming `field` otherwise."""
    return safe_key(key, field=field, prefix=UPLOADS)


# Training sets ---------------------------------------------------------------------------------

def training_set_prefix(set_id: str) -> str:
    """Everything a training set stores lies under its own prefix (removed whole if it FAILED)."""
    return f"{SNAPSHOTS}{set_id}/"


def training_set_image(set_id: str, tile: str, digest: str, ext: str) -> str:
    """A tile image's key; `digest` is the hex sha256 of its bytes."""
    return f"{training_set_prefix(set_id)}images/{tile}-{digest[:16]}{ext}"


def training_set_mask(set_id: str, tile: str, digest: str) -> str:
    return f"{training_set_prefix(set_id)}masks/{tile}-{digest[:16]}.png"


def check_training_set_key(key: str, *, field: str) -> str:
    return safe_key(key, field=field, prefix=SNAPSHOTS)


# Job attempts ----------------------------------------------------------------------------------

def job_prefix(job_id: str) -> str:
    return f"{JOBS}{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    """Everything one attempt of a job writes lies under this prefix."""
    return _attempt(job_prefix(job_id), attempt)


def attempt_tile_manifest(prefix: str) -> str:
    """The tiles of the attempt whose keys start with `prefix` (attempt_prefix)."""
    return f"{prefix}tiles.pb"


def _attempt(owner_prefix: str, attempt: int) -> str:
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    return f"{owner_prefix}attempts/{attempt}/"


def _expected(prefix: str, expected: str, *, field: str, what: str) -> str:
    if prefix != expected:
        raise InvalidArgumentError.of(field, f"must be {expected!r} for this {what}, got {prefix!r}")
    return prefix


def state_checkpoint(attempt_prefix: str) -> str:
    return f"{attempt_prefix}checkpoints/state-latest.pt"


def model_weights(attempt_prefix: str, kind: ModelKind) -> str:
    return f"{attempt_prefix}models/{kind}.safetensors"


def check_attempt_prefix(prefix: str, *, job_id: str, attempt: int, field: str) -> str:
    """`prefix` if it is the one this job attempt writes under; INVALID_ARGUMENT otherwise."""
    return _expected(prefix, attempt_prefix(job_id, attempt), field=field, what="job attempt")


def check_job_key(key: str, *, job_id: str, field: str) -> str:
    """`key` if it lies under the job's own keys (any attempt, or the layout before attempts)."""
    return safe_key(key, field=field, prefix=job_prefix(job_id))


def export_format_name(value: int) -> str:
    """"hf", "onnx" or "torchscript" for an ExportFormat; INVALID_ARGUMENT naming `format` otherwise."""
    if value == common_pb2.EXPORT_FORMAT_UNSPECIFIED or value not in common_pb2.ExportFormat.values():
        names = ", ".join(n.removeprefix("EXPORT_FORMAT_") for n in common_pb2.ExportFormat.keys()[1:])
        raise InvalidArgumentError.of("format", f"name an export format: {names}")
    return common_pb2.ExportFormat.Name(value).removeprefix("EXPORT_FORMAT_").lower()  # type: ignore[arg-type]


def model_exports_prefix(job_id: str) -> str:
    """Every export of the model that job `job_id` trained lies under this prefix."""
    return f"{job_prefix(job_id)}exports/"


def model_export_prefix(job_id: str, fmt: str) -> str:
    """One format's export of the model that job `job_id` trained."""
    return f"{model_exports_prefix(job_id)}{fmt}/"


def export_manifest(prefix: str) -> str:
    """Written last: an export is complete once it exists."""
    return f"{prefix}manifest.json"


def check_model_export_prefix(prefix: str, *, fmt: str, field: str) -> str:
    """`prefix` if it is an export prefix of format `fmt` (model_export_prefix); INVALID_ARGUMENT otherwise."""
    safe_key(prefix.removesuffix("/"), field=field, prefix=JOBS)
    job_id = prefix.removeprefix(JOBS).split("/")[0]
    if not job_id or prefix != model_export_prefix(job_id, fmt):
        raise InvalidArgumentError.of(field, f"must be {model_export_prefix('{job}', fmt)!r}, got {prefix!r}")
    return prefix


def check_model_key(key: str, *, field: str) -> str:
    """`key` if it can name a job's model file."""
    safe_key(key, field=field, prefix=JOBS)
    if not key.endswith(".safetensors"):
        raise InvalidArgumentError.of(field, f"{key!r} is not a model file (.safetensors)")
    return key


# Analyses ------------------------------------------------------------------------------------

def analysis_prefix(analysis_id: str) -> str:
    return f"{ANALYSES}{analysis_id}/"


def analysis_mask(analysis_prefix: str, image_key: str) -> str:
    """The mask of one analysed image: named by the image's stem (so stems must be unique)."""
    return f"{analysis_prefix}masks/{PurePosixPath(image_key).stem}.png"


# Analysis jobs ---------------------------------------------------------------------------------

def analysis_inputs(analysis_id: str) -> str:
    return f"{analysis_prefix(analysis_id)}inputs.jsonl"


def analysis_attempt_prefix(analysis_id: str, attempt: int) -> str:
    """Everything one attempt of an analysis job writes lies under this prefix."""
    return _attempt(analysis_prefix(analysis_id), attempt)


def analysis_tile_mask(attempt_prefix: str, tile: str) -> str:
    return f"{attempt_prefix}masks/{tile}.png"


def analysis_result(attempt_prefix: str, file_name: str) -> str:
    return f"{attempt_prefix}results/{file_name}"


def check_analysis_attempt_prefix(prefix: str, *, analysis_id: str, attempt: int, field: str) -> str:
    return _expected(prefix, analysis_attempt_prefix(analysis_id, attempt), field=field, what="analysis attempt")


def check_analysis_key(key: str, *, analysis_id: str, field: str) -> str:
    """`key` if it lies under the analysis job's own keys."""
    return safe_key(key, field=field, prefix=analysis_prefix(analysis_id))


# Scratch -----------------------------------------------------------------------------------------

def scratch_prefix(name: str) -> str:
    """Objects a measurement writes and deletes again (never read by the services)."""
    return f"{SCRATCH}{name}/"


def check_analysis_prefix(prefix: str, *, field: str) -> str:
    safe_key(prefix.rstrip("/"), field=field, prefix=ANALYSES)
    if not prefix.endswith("/") or prefix.count("/") != 2:
        raise InvalidArgumentError.of(field, f"must look like '{ANALYSES}{{analysis_id}}/', got {prefix!r}")
    return prefix
