"""The Python SDK: every step of the workflow over the generated gRPC stubs.

Files move through presigned URLs, so a client needs only the pipeline service's address
(SEGTRAIN_ADDRESS); the metrics service's address comes from GetServiceInfo. Idempotent calls are
retried on UNAVAILABLE with backoff by the channel's retry policy; nothing else is retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.pipeline.v1 import pipeline_pb2_grpc

from clients import addresses, names, profiles
from clients.names import TERMINAL as TERMINAL  # public since the first SDK: the states that end a job

log = logging.getLogger(__name__)


def job_name(job: str) -> str:
    """The job's resource name, for an id or a name (public since the first SDK; see clients.names)."""
    return names.job(job)


DEFAULT_ADDRESS = "127.0.0.1:50051"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
# Files per CreateUpload (the service takes up to 5000), presigned PUTs in flight, retries of one.
UPLOAD_BATCH, UPLOAD_THREADS, UPLOAD_RETRIES = 1000, 8, 5

_RETRY_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "segtrain.pipeline.v1.PipelineService"}, {"service": "segtrain.metrics.v1.MetricsService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.enable_retries", 1),
    ("grpc.service_config", _RETRY_CONFIG),
]


# The formats of Client.export_model, by their CLI names.
EXPORT_FORMATS = {"hf": common_pb2.EXPORT_FORMAT_HF, "onnx": common_pb2.EXPORT_FORMAT_ONNX,
                  "torchscript": common_pb2.EXPORT_FORMAT_TORCHSCRIPT}


class TrainingSetFailedError(Exception):
    """A training set ended FAILED; `training_set` says why (failure_reason, report.issues)."""

    def __init__(self, training_set: pb.TrainingSet) -> None:
        super().__init__(f"{training_set.name} FAILED: {training_set.failure_reason}")
        self.training_set = training_set


def first_held_seq(error: grpc.RpcError) -> int | None:
    """The first seq the metrics service still holds, from an OUT_OF_RANGE of expired events."""
    if error.code() != grpc.StatusCode.OUT_OF_RANGE:
        return None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == "EVENTS_EXPIRED":
            return int(info.metadata["first_held_seq"])
    return None


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _Details(details, [*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression, self.metadata = base.wait_for_ready, base.compression, metadata


@dataclass(frozen=True)
class Tls:
    """How the client reaches the services: TLS verified with `ca_file` (None: the system's
    roots), presenting `cert_file` and `key_file` for mutual TLS when given."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_profile(cls, profile: profiles.Profile) -> Tls | None:
        files = {field: Path(value) for field, value in (
            ("ca_file", profile.tls_ca_file), ("cert_file", profile.tls_cert_file),
            ("key_file", profile.tls_key_file)) if value}
        return cls(**files) if files or profile.tls else None

    @classmethod
    def from_environment(cls) -> Tls | None:
        """TLS when SEGTRAIN_TLS is true or SEGTRAIN_TLS_CA_FILE / SEGTRAIN_TLS_CERT_FILE is set."""
        env = os.environ
        variables = (("ca_file", "SEGTRAIN_TLS_CA_FILE"), ("cert_file", "SEGTRAIN_TLS_CERT_FILE"),
                 ("key_file", "SEGTRAIN_TLS_KEY_FILE"))
        files = {field: Path(env[variable]) for field, variable in variables if env.get(variable)}
        if files or env.get("SEGTRAIN_TLS", "").lower() in ("1", "true", "yes"):
            return cls(**files)
        return None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


class PlaintextTokenError(ValueError):
    """A token would travel unencrypted to another machine."""


class Client:
    """A connection to a segtrain deployment. Each of the address, token and TLS comes from the
    argument, else the environment (SEGTRAIN_ADDRESS, SEGTRAIN_TOKEN, Tls.from_environment), else
    the profile (clients/profiles.py: `profile`, $SEGTRAIN_PROFILE or the current one, as `segtrain
    up` or `segtrain login` wrote it), else the default. A profile's token and TLS files go only to
    its own address: given another address, the profile is used only when named. A token is never
    sent in plaintext beyond this machine unless `allow_plaintext` (or
    SEGTRAIN_ALLOW_PLAINTEXT=true, for a private network) says so."""

    def __init__(self, address: str | None = None, *, token: str | None = None, timeout: float = 60.0,
                 tls: Tls | None = None, allow_plaintext: bool | None = None, profile: str | None = None) -> None:
        given = address or os.environ.get("SEGTRAIN_ADDRESS") or None
        chosen = profiles.load(profile)
        if chosen is not None and given is not None and given != chosen.address and not profile:
            chosen = None  # another deployment than the profile's
        self.address = given or (chosen.address if chosen else DEFAULT_ADDRESS)
        self.timeout = timeout
        self._token = token if token is not None else (
            os.environ.get("SEGTRAIN_TOKEN") or (chosen.token if chosen else ""))
        self._tls = tls if tls is not None else (
            Tls.from_environment() or (Tls.from_profile(chosen) if chosen else None))
        self._allow_plaintext = (allow_plaintext if allow_plaintext is not None else
                                 os.environ.get("SEGTRAIN_ALLOW_PLAINTEXT", "").lower() in ("1", "true", "yes"))
        self._raw_channels: list[grpc.Channel] = []
        self._channel = self._connect(self.address)
        self.pipeline = pipeline_pb2_grpc.PipelineServiceStub(self._channel)
        self._metrics: metrics_pb2_grpc.MetricsServiceStub | None = None

    def _connect(self, address: str) -> grpc.Channel:
        """A channel to `address`, which may list replicas (clients/addresses.py)."""
        target = addresses.parse(address)
        options = CHANNEL_OPTIONS + target.options
        if self._tls is not None:
            channel = grpc.secure_channel(target.target, self._tls.credentials(), options=options)
        elif self._token and not self._allow_plaintext and not target.is_loopback:
            raise PlaintextTokenError(
                f"refusing to send a token in plaintext to {address}: use TLS (SEGTRAIN_TLS_CA_FILE, or "
                "SEGTRAIN_TLS=true for the system's roots), or set SEGTRAIN_ALLOW_PLAINTEXT=true on a private network")
        else:
            channel = grpc.insecure_channel(target.target, options=options)
        self._raw_channels.append(channel)
        return grpc.intercept_channel(channel, _Bearer(self._token)) if self._token else channel

    def close(self) -> None:
        for channel in self._raw_channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metrics(self) -> metrics_pb2_grpc.MetricsServiceStub:
        if self._metrics is None:
            info = self.pipeline.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=self.timeout)
            self._metrics = metrics_pb2_grpc.MetricsServiceStub(self._connect(info.metrics_address))
        return self._metrics

    # Pipelines and architectures
    def list_pipelines(self) -> list[pb.Pipeline]:
        return _all_pages(lambda token: self.pipeline.ListPipelines(
            pb.ListPipelinesRequest(page_token=token), timeout=self.timeout), "pipelines")

    def list_architectures(self) -> list[pb.Architecture]:
        return list(self.pipeline.ListArchitectures(pb.ListArchitecturesRequest(), timeout=self.timeout).architectures)

    # Files and training sets
    def upload(self, paths: Sequence[Path]) -> dict[Path, str]:
        """Uploads files through presigned URLs, UPLOAD_BATCH per CreateUpload and UPLOAD_THREADS
        at a time; returns each path's object key."""
        keys: dict[Path, str] = {}
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload") as pool:
            for start in range(0, len(paths), UPLOAD_BATCH):
                batch = list(paths[start : start + UPLOAD_BATCH])
                upload = self.pipeline.CreateUpload(pb.CreateUploadRequest(file_names=[p.name for p in batch]),
                                                    timeout=self.timeout)
                for path, file in zip(batch, upload.files, strict=True):
                    keys[path] = file.key
                list(pool.map(self._put, batch, [f.url for f in upload.files]))
        return keys

    def _put(self, path: Path, url: str) -> None:
        """One presigned PUT; a server error or a dropped connection is retried with backoff, as
        S3 clients do (PUT is idempotent; the local stack's S3 server answers 500 to some
        concurrent PUTs into a new folder)."""
        data = path.read_bytes()
        for attempt in range(UPLOAD_RETRIES + 1):
            try:
                request = urllib.request.Request(url, data=data, method="PUT")
                with urllib.request.urlopen(request, timeout=self.timeout):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == UPLOAD_RETRIES:
                    raise RuntimeError(f"upload of {path.name} failed with HTTP {exc.code}") from None
            except (urllib.error.URLError, ConnectionError) as exc:
                if attempt == UPLOAD_RETRIES:
                    raise RuntimeError(f"upload of {path.name} failed: {exc}") from None
            time.sleep(0.2 * 2**attempt)

    def create_training_set(
        self, name: str, tiles_dir: Path, annotations: Path, *, format: str = "masks",
        pipeline: str = names.DEFAULT_PIPELINE, class_names: Sequence[str] = (), group_by: str = "",
        instance_class: int | None = None, request_id: str = "", wait: bool = True,
        on_progress: Callable[[pb.TrainingSet], None] | None = None,
    ) -> pb.TrainingSet:
        """Uploads tiles with their annotations and creates the set; with `wait`, returns it READY
        (TrainingSetFailedError if it FAILED), else at once, PREPARING.

        `annotations` is a folder of per-tile files paired with tiles by file stem (class-index or
        instance masks, per-tile GeoJSON, Django-Labeller `<stem>__labels.json`), or one file for
        all tiles (COCO JSON, or GeoJSON whose features name their tile). `group_by` is a regular
        expression whose first group, matched on a tile's file stem, names its source image (e.g.
        r"^(.*)_tile" for "slide3_tile07"): tiles of one source image never straddle the
        train/validation split. Without it every tile is its own source.
        """
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
        pattern = re.compile(group_by) if group_by else None
        tiles = sorted(p for p in Path(tiles_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not tiles:
            raise ValueError(f"no tiles (png, jpg, tif) in {tiles_dir}")
        request = pb.CreateTrainingSetRequest(
            training_set_id=name, display_name=name, pipeline=names.pipeline(pipeline),
            class_names=list(class_names), format=FORMATS[format])
        if instance_class is not None:
            request.instance_class = instance_class
        paired = _pair_by_stem(tiles, Path(annotations), format) if Path(annotations).is_dir() else {}
        files = [*tiles, *paired.values()] if paired else [*tiles, Path(annotations)]
        # Uploads get fresh keys, so a repeated call is a new request to the service: its content
        # (these files and parameters) is what makes it the same one.
        request.request_id = request_id or _content_request_id(request, group_by, files)
        tile_keys = self.upload(tiles)
        if paired:
            annotation_keys = self.upload(list(paired.values()))
            keys = {t: annotation_keys[paired[t]] for t in tiles}
        else:
            request.annotations_key = self.upload([Path(annotations)])[Path(annotations)]
            keys = {}
        request.tiles.extend(pb.TileInput(image_key=tile_keys[t], annotation_key=keys.get(t, ""),
                                          source_image=_source_image(t.stem, pattern)) for t in tiles)
        created = self.pipeline.CreateTrainingSet(request, timeout=self.timeout)
        return self.wait_for_training_set(created.name, on_progress=on_progress) if wait else created

    def get_training_set(self, training_set: str) -> pb.TrainingSet:
        return self.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(name=names.training_set(training_set)),
                                            timeout=self.timeout)

    def wait_for_training_set(self, training_set: str, *, timeout_s: float = 3600.0,
                              on_progress: Callable[[pb.TrainingSet], None] | None = None) -> pb.TrainingSet:
        """Polls a PREPARING set until it is READY (returned) or FAILED (TrainingSetFailedError)."""
        deadline, pause = time.monotonic() + timeout_s, 0.05
        while True:
            ts = self.get_training_set(training_set)
            if on_progress is not None:
                on_progress(ts)
            if ts.state == pb.TrainingSet.STATE_READY:
                return ts
            if ts.state == pb.TrainingSet.STATE_FAILED:
                raise TrainingSetFailedError(ts)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ts.name} still PREPARING after {timeout_s:.0f} s "
                                   f"({ts.tiles_checked}/{ts.tile_count} tiles checked)")
            time.sleep(pause)
            pause = min(1.0, pause * 2)

    def list_training_sets(self, *, owner: str = "") -> list[pb.TrainingSet]:
        """Every set, newest first; only those `owner` created, when given."""
        return _all_pages(lambda token: self.pipeline.ListTrainingSets(
            pb.ListTrainingSetsRequest(page_token=token, owner=owner), timeout=self.timeout), "training_sets")

    # Jobs
    def list_jobs(self, *, owner: str = "") -> list[pb.Job]:
        """Every job, newest first; only those `owner` created, when given."""
        return _all_pages(lambda token: self.pipeline.ListJobs(
            pb.ListJobsRequest(page_token=token, owner=owner), timeout=self.timeout), "jobs")

    def create_job(self, *, pipeline: str, training_set: str, from_model: str = "",
                   hyperparameters: common_pb2.Hyperparameters | None = None, request_id: str = "",
                   processes: int = 0, nodes: int = 0) -> pb.Job:
        """`processes` per node and `nodes` train data-parallel (0: 1); the batch size is the global batch."""
        return self.pipeline.CreateJob(pb.CreateJobRequest(
            pipeline=names.pipeline(pipeline), training_set=names.training_set(training_set),
            from_model=names.model(from_model), hyperparameters=hyperparameters, request_id=request_id,
            parallelism=common_pb2.Parallelism(processes=processes, nodes=nodes),
        ), timeout=self.timeout)

    def start_job(self, job: str) -> pb.Job:
        return self.pipeline.StartJob(pb.StartJobRequest(name=names.job(job)), timeout=self.timeout)

    def get_job(self, job: str) -> pb.Job:
        return self.pipeline.GetJob(pb.GetJobRequest(name=names.job(job)), timeout=self.timeout)

    def cancel_job(self, job: str, *, stop_early: bool = False) -> pb.Job:
        return self.pipeline.CancelJob(pb.CancelJobRequest(name=names.job(job), stop_early=stop_early),
                                       timeout=self.timeout)

    def rerun(self, job: str, *, start: bool = True) -> pb.Job:
        """A new job with the same training set, parent and hyperparameters (seed included)."""
        original = self.get_job(job)
        again = self.create_job(pipeline=original.pipeline, training_set=original.training_set,
                                from_model=original.from_model, hyperparameters=original.hyperparameters,
                                processes=original.parallelism.processes, nodes=original.parallelism.nodes)
        return self.start_job(again.name) if start else again

    def compare(self, jobs: Sequence[str]) -> pb.JobComparison:
        return self.pipeline.CompareJobs(pb.CompareJobsRequest(jobs=[names.job(j) for j in jobs]),
                                         timeout=self.timeout)

    def watch(self, job: str, *, after_seq: int = 0, reconnect: bool = True,
              include_batch_progress: bool = True) -> Iterator[common_pb2.JobEvent]:
        """The events of a job (or of an analysis job, by its name) from after `after_seq` to
        its final event. On a dropped stream it reconnects after the last seq it yielded, so
        nothing is missed or repeated. Events the service no longer holds (event-log retention)
        are skipped with a warning, from the first it holds; with `reconnect=False` that is
        OUT_OF_RANGE."""
        last, delay = after_seq, 0.2
        while True:
            request = metrics_pb2.WatchJobEventsRequest(job=names.run(job), after_seq=last,
                                                        include_batch_progress=include_batch_progress)
            try:
                for item in self.metrics.WatchJobEvents(request):
                    delay = 0.2
                    if item.HasField("event"):
                        last = item.event.seq
                        yield item.event
                return
            except grpc.RpcError as exc:
                first_held = first_held_seq(exc)
                if reconnect and first_held is not None and first_held > last + 1:
                    log.warning("events %d..%d of %s are no longer held; watching from %d", last + 1, first_held - 1,
                                job, first_held)
                    last = first_held - 1
                    continue
                # CANCELLED is never this loop's own doing (a consumer that stops closes the generator,
                # which raises no RpcError): the transport cancels some of a burst of new streams
                # before the service sees them (README, Benchmarks: Watchers).
                resumable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           grpc.StatusCode.CANCELLED)
                if not (reconnect and resumable):
                    raise
                log.info("watch interrupted (%s); resuming after seq %d", exc.code(), last)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def history(self, job: str) -> metrics_pb2.JobHistory:
        return self.metrics.GetJobHistory(metrics_pb2.GetJobHistoryRequest(job=names.job(job)), timeout=self.timeout)

    def charts(self, jobs: Sequence[str], width: int = 800, height: int = 480) -> tuple[bytes, bytes]:
        response = self.metrics.RenderJobCharts(metrics_pb2.RenderJobChartsRequest(
            jobs=[names.job(j) for j in jobs], width=width, height=height), timeout=self.timeout)
        return response.loss_png, response.iou_png

    # Models and analysis
    def get_model(self, model: str) -> pb.Model:
        return self.pipeline.GetModel(pb.GetModelRequest(name=names.model(model)), timeout=self.timeout)

    def list_models(self, *, owner: str = "") -> list[pb.Model]:
        """Every model, newest first; only those of `owner`'s jobs, when given."""
        return _all_pages(lambda token: self.pipeline.ListModels(
            pb.ListModelsRequest(page_token=token, owner=owner), timeout=self.timeout), "models")

    def export_model(self, model: str, format: str, out_dir: Path | None = None, *, timeout: float = 1800.0
                     ) -> pb.ModelExport:
        """The model's export to `format` ("hf", "onnx" or "torchscript"; see EXPORT_FORMATS),
        made on a trainer node the first time (up to `timeout` seconds for a large model's ONNX).
        With `out_dir`, its files are downloaded there, each checked against its sha256."""
        try:
            value = EXPORT_FORMATS[format]
        except KeyError:
            raise ValueError(f"unknown export format {format!r}; valid: {', '.join(EXPORT_FORMATS)}") from None
        export: pb.ModelExport = self.pipeline.ExportModel(
            pb.ExportModelRequest(name=names.model(model), format=value), timeout=timeout)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="download") as pool:
                list(pool.map(lambda f: self._download(f, out_dir), export.files))
        return export

    def _download(self, file: common_pb2.ExportedFile, out_dir: Path) -> None:
        """Streams one export file to `out_dir` (a part file renamed once its sha256 matches)."""
        path = (out_dir / file.name).resolve()
        if not path.is_relative_to(out_dir.resolve()):  # a name from the server never writes outside out_dir
            raise ValueError(f"export file name {file.name!r} leaves {out_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(file.url, timeout=self.timeout) as response, part.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != file.sha256:
            part.unlink()
            raise OSError(f"{file.name}: the download does not match its sha256 (got {digest.hexdigest()[:12]}…, "
                          f"expected {file.sha256[:12]}…)")
        part.replace(path)

    def create_analysis(self, model: str, *, tiles: Sequence[Path] = (), training_set: str = "",
                        display_name: str = "", request_id: str = "") -> pb.AnalysisJob:
        """Starts an analysis job of `model` on local images (uploaded first) or on a training
        set's tiles; returns it QUEUED. Follow it with `watch` or `wait_for_analysis`."""
        keys = self.upload(list(tiles)) if tiles else {}
        return self.pipeline.CreateAnalysisJob(pb.CreateAnalysisJobRequest(
            model=names.model(model), image_keys=[keys[t] for t in tiles],
            training_set=names.training_set(training_set), display_name=display_name, request_id=request_id,
        ), timeout=max(self.timeout, 60))

    def get_analysis(self, analysis: str) -> pb.AnalysisJob:
        return self.pipeline.GetAnalysisJob(pb.GetAnalysisJobRequest(name=names.analysis(analysis)),
                                            timeout=self.timeout)

    def list_analyses(self, *, owner: str = "") -> list[pb.AnalysisJob]:
        """Every analysis, newest first; only those `owner` created, when given."""
        return _all_pages(lambda token: self.pipeline.ListAnalysisJobs(
            pb.ListAnalysisJobsRequest(page_token=token, owner=owner), timeout=self.timeout), "analysis_jobs")

    # Deletion: never of what is still in use (FAILED_PRECONDITION naming what uses it).
    def delete_training_set(self, training_set: str) -> None:
        self.pipeline.DeleteTrainingSet(pb.DeleteTrainingSetRequest(name=names.training_set(training_set)),
                                        timeout=max(self.timeout, 60))

    def delete_job(self, job: str) -> None:
        self.pipeline.DeleteJob(pb.DeleteJobRequest(name=names.job(job)), timeout=max(self.timeout, 60))

    def delete_model(self, model: str) -> None:
        self.pipeline.DeleteModel(pb.DeleteModelRequest(name=names.model(model)), timeout=max(self.timeout, 60))

    def delete_analysis(self, analysis: str) -> None:
        self.pipeline.DeleteAnalysisJob(pb.DeleteAnalysisJobRequest(name=names.analysis(analysis)),
                                        timeout=max(self.timeout, 60))

    def cancel_analysis(self, analysis: str) -> pb.AnalysisJob:
        return self.pipeline.CancelAnalysisJob(pb.CancelAnalysisJobRequest(name=names.analysis(analysis)),
                                               timeout=self.timeout)

    def wait_for_analysis(self, analysis: str, *, on_event: Callable[[common_pb2.JobEvent], None] | None = None
                          ) -> pb.AnalysisJob:
        """Follows the analysis's events to its end; returns it as it ended (any terminal state)."""
        for event in self.watch(names.analysis(analysis)):
            if on_event is not None:
                on_event(event)
        return self.get_analysis(analysis)

    def analysis_tiles(self, analysis: str) -> Iterator[pb.TileAnalysis]:
        """Every tile's result of a SUCCEEDED analysis, in input order, with its mask's URL."""
        token = ""
        while True:
            page = self.pipeline.ListAnalysisTiles(pb.ListAnalysisTilesRequest(
                name=names.analysis(analysis), page_token=token), timeout=self.timeout)
            yield from page.tiles
            token = page.next_page_token
            if not token:
                return

    def download_analysis(self, analysis: pb.AnalysisJob, out_dir: Path) -> list[pb.TileAnalysis]:
        """Writes a SUCCEEDED analysis's results to `out_dir`: `<tile>.png` class-index masks, and
        manifest.json, tiles.csv, tiles.json, classes.csv, classes.json. Returns the tiles."""
        out_dir.mkdir(parents=True, exist_ok=True)
        results = analysis.results
        files = {"manifest.json": results.manifest, "tiles.csv": results.tiles_csv, "tiles.json": results.tiles_json,
                 "classes.csv": results.classes_csv, "classes.json": results.classes_json}
        tiles = list(self.analysis_tiles(analysis.name))
        downloads = [(f.url, out_dir / name) for name, f in files.items()]
        downloads += [(t.mask_url, out_dir / f"{t.tile}.png") for t in tiles if t.mask_url]
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="download") as pool:
            list(pool.map(lambda item: self._get(*item), downloads))
        return tiles

    def _get(self, url: str, path: Path) -> None:
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            path.write_bytes(response.read())

    def analyze(self, model: str, tiles: Sequence[Path], out_dir: Path,
                on_event: Callable[[common_pb2.JobEvent], None] | None = None) -> AnalysisResult:
        """Runs the model on local images as an analysis job and downloads its results to
        `out_dir` (see download_analysis). AnalysisFailedError if it did not succeed."""
        job = self.wait_for_analysis(self.create_analysis(model, tiles=tiles).name, on_event=on_event)
        if job.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise AnalysisFailedError(job)
        return AnalysisResult(job, self.download_analysis(job, out_dir))


@dataclass(frozen=True)
class AnalysisResult:
    """A finished analysis job and its tiles' results (masks written where `analyze` was told)."""

    job: pb.AnalysisJob
    tiles: list[pb.TileAnalysis]


class AnalysisFailedError(RuntimeError):
    def __init__(self, job: pb.AnalysisJob) -> None:
        super().__init__(f"{job.name} {names.state_name(job.state)}: {job.failure_reason}")
        self.job = job


FORMATS = {
    "masks": pb.ANNOTATION_FORMAT_MASKS, "instance-masks": pb.ANNOTATION_FORMAT_INSTANCE_MASKS,
    "coco": pb.ANNOTATION_FORMAT_COCO, "geojson": pb.ANNOTATION_FORMAT_GEOJSON,
    "labeller": pb.ANNOTATION_FORMAT_LABELLER,
}
_ANNOTATION_SUFFIXES = {"masks": IMAGE_SUFFIXES, "instance-masks": IMAGE_SUFFIXES,
                        "geojson": {".geojson", ".json"}, "labeller": {".json"}}


def _content_request_id(request: pb.CreateTrainingSetRequest, group_by: str, files: Sequence[Path]) -> str:
    """An idempotency key from what a set is made of: the request's parameters, the files' names
    and bytes."""
    digest = hashlib.sha256(request.SerializeToString(deterministic=True) + group_by.encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"sdk-{digest.hexdigest()[:40]}"


def _pair_by_stem(tiles: list[Path], folder: Path, format: str) -> dict[Path, Path]:
    suffixes = _ANNOTATION_SUFFIXES.get(format)
    if suffixes is None:
        raise ValueError(f"{format} annotations come in one file, not a folder")
    # Django-Labeller names a tile's labels "<stem>__labels.json".
    found = {p.stem.removesuffix("__labels"): p for p in folder.iterdir() if p.suffix.lower() in suffixes}
    missing = [t.name for t in tiles if t.stem not in found]
    if missing:
        raise ValueError(f"no annotation file for tiles {missing[:5]} in {folder}")
    return {t: found[t.stem] for t in tiles}


def _source_image(stem: str, pattern: re.Pattern[str] | None) -> str:
    match = pattern.search(stem) if pattern else None
    return match.group(1) if match and match.groups() else ""


def _all_pages(call, field: str) -> list:  # type: ignore[no-untyped-def, type-arg]
    items, token = [], ""
    while True:
        response = call(token)
        items += list(getattr(response, field))
        token = response.next_page_token
        if not token:
            return items
