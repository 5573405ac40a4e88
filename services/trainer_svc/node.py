"""The trainer node: accepts jobs (each attempt in its own process group), serves their event logs, registers
with the pipeline service and heartbeats, stopping jobs the pipeline no longer assigns here, and
hands its jobs back when it shuts down."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from segtrain.trainer.v1 import trainer_pb2

from services.common import names, object_keys, request_limits
from services.common.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    check,
)
from services.common.storage import ObjectStore, ObjectTooLargeError
from services.trainer_svc.attempts import AttemptProcess
from services.trainer_svc.exports import Exporter
from services.trainer_svc.runs import RunRegistry

log = logging.getLogger(__name__)
WATCH_POLL_S = 1.0


class Analyses(Protocol):
    def analyze(self, request: trainer_pb2.AnalyzeTilesRequest,
                is_active: Callable[[], bool] = ...) -> trainer_pb2.AnalyzeTilesResponse: ...


class AnalyzerOnDemand:
    """Analysis runs in the node's process and needs torch; training runs in worker processes.
    The analyzer (and torch) is loaded when the first analysis comes, so a node that only trains
    stays small (a few hundred MB less per node)."""

    def __init__(self, load: Callable[[], Analyses]) -> None:
        self._load = load
        self._analyzer: Analyses | None = None
        self._lock = threading.Lock()

    def analyze(self, request: trainer_pb2.AnalyzeTilesRequest,
                is_active: Callable[[], bool] = lambda: True) -> trainer_pb2.AnalyzeTilesResponse:
        with self._lock:
            if self._analyzer is None:
                self._analyzer = self._load()
        return self._analyzer.analyze(request, is_active)


@dataclass(frozen=True)
class NodeOffer:
    """What the node tells the pipeline service it offers one job (admission)."""

    device: str
    job_memory_bytes: int = 0
    max_processes: int = 1


class TrainerNode:
    def __init__(self, analyzer: Analyses, store: ObjectStore, *, capacity: int, worker_env: dict[str, str]) -> None:
        self.analyzer = analyzer
        self.exporter = Exporter(worker_env)
        self.store = store
        self.runs = RunRegistry(capacity)
        self.draining = False
        # The host other nodes reach this one's rendezvous stores at (its advertised address's).
        self.rendezvous_host = "127.0.0.1"
        # The environment of every attempt's worker: the node's own settings, passed on.
        self._worker_env = worker_env
        # The attempts still running, by job (finished ones are dropped when the next one starts).
        self._attempts: dict[str, AttemptProcess] = {}

    def run_job(self, request: trainer_pb2.RunJobRequest) -> tuple[bool, str]:
        """Starts the attempt; returns whether it is new here and, on node rank 0 of a multi-node
        attempt, the rendezvous endpoint the other nodes join (a port of its own per attempt)."""
        _validate(request)
        if self.draining:
            raise FailedPreconditionError("this trainer node is shutting down")
        if not request.HasField("analysis"):
            request = _with_tiles(request, self.store)
        run = self.runs.add(request.job, request.attempt)
        if run is None:
            current = self._attempts.get(request.job)
            return False, current.rendezvous if current is not None and request.node_rank == 0 else ""
        run.batch_size = request.hyperparameters.batch_size
        endpoint = request.rendezvous_endpoint
        if request.parallelism.nodes > 1 and request.node_rank == 0:
            endpoint = f"{self.rendezvous_host}:{_free_port(self.rendezvous_host)}"
        attempt = AttemptProcess(run, request, env=self._worker_env, rendezvous=endpoint)
        self._attempts = {job: a for job, a in self._attempts.items() if not a.run.finished}
        self._attempts[request.job] = attempt
        attempt.start()
        return True, endpoint if request.node_rank == 0 else ""

    def watch(self, job: str, attempt: int, after: int, is_active: Callable[[], bool]
              ) -> Iterator[common_pb2.JobEvent]:
        return self.runs.get(job, attempt).follow(after, WATCH_POLL_S, is_active)

    def cancel(self, job: str, stop_early: bool) -> bool:
        run = self.runs.find(job)
        if run is None or run.finished:
            return False
        run.request_cancel(stop_early)
        return True

    def running_jobs(self) -> list[str]:
        return [r.job for r in self.runs.active()]

    def hand_back_all(self, grace_s: float) -> None:
        """Takes no more work and stops every running job at its next batch, handing it back; waits
        up to `grace_s` for each to finish its log."""
        self.draining = True
        runs = self.runs.active()
        for run in runs:
            run.hand_back()
        for run in runs:
            if not run.wait_finished(grace_s):
                log.warning("%s did not hand back within %.0f s; killing its worker", run.job, grace_s)
                attempt = self._attempts.get(run.job)
                if attempt is not None:
                    attempt.kill()


def _free_port(host: str) -> int:
    """A port free on `host` now, for the attempt's rendezvous store (its launcher binds it a moment
    later; another process taking it in between fails the attempt, which is retried)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _validate(request: trainer_pb2.RunJobRequest) -> None:
    """Every key the attempt reads lies in the layout's place for it; it writes only under its own
    attempt's prefix."""
    if request.HasField("analysis"):
        _validate_analysis(request)
        return
    job_id = names.parse_name(request.job, names.JOBS, field="job")
    v = []
    if request.attempt < 1:
        v.append(FieldViolation("attempt", "must be >= 1"))
    if request.tiles:
        v.append(FieldViolation("tiles", "send the tiles in tile_manifest (an object), not in the request"))
    if not request.tile_manifest.uri:
        v.append(FieldViolation("tile_manifest", "required: the object holding the attempt's tiles"))
    nodes = request.parallelism.nodes or 1
    if not 0 <= request.node_rank < nodes:
        v.append(FieldViolation("node_rank", f"must be in [0, {nodes})"))
    if nodes > 1 and request.node_rank > 0 and ":" not in request.rendezvous_endpoint:
        v.append(FieldViolation("rendezvous_endpoint", "host:port of node rank 0's rendezvous, required"))
    check(v)
    object_keys.check_attempt_prefix(request.output_prefix, job_id=job_id, attempt=request.attempt,
                                     field="output_prefix")
    if request.tile_manifest.uri != object_keys.attempt_tile_manifest(request.output_prefix):
        raise InvalidArgumentError.of("tile_manifest.uri", "must be the attempt's own tile manifest "
                                      f"{object_keys.attempt_tile_manifest(request.output_prefix)!r}")
    if request.resume_checkpoint_uri:
        object_keys.check_job_key(request.resume_checkpoint_uri, job_id=job_id, field="resume_checkpoint_uri")
    if request.HasField("from_model"):
        object_keys.check_model_key(request.from_model.weights_uri, field="from_model.weights_uri")


def _with_tiles(request: trainer_pb2.RunJobRequest, store: ObjectStore) -> trainer_pb2.RunJobRequest:
    """The request with the tiles of its manifest, once the manifest matches its recorded size and
    sha256 and every tile key lies in the training sets' layout: what the worker is handed."""
    manifest, field = request.tile_manifest, "tile_manifest"
    try:
        data = store.get(manifest.uri, max_bytes=MAX_MANIFEST_BYTES)
    except NotFoundError:
        raise InvalidArgumentError.of(field, f"no object {manifest.uri!r}") from None
    except ObjectTooLargeError as exc:
        raise InvalidArgumentError.of(field, exc.message) from None
    if len(data) != manifest.size_bytes or hashlib.sha256(data).hexdigest() != manifest.sha256.lower():
        raise InvalidArgumentError.of(field, "the object does not match the size and sha256 the request names")
    try:
        tiles = trainer_pb2.TileManifest.FromString(data)
    except DecodeError:
        raise InvalidArgumentError.of(field, "not a TileManifest") from None
    check([FieldViolation(f"{field}.{v.field}", v.description) for v in request_limits.violations(tiles)])
    if not tiles.tiles:
        raise InvalidArgumentError.of(field, "no tiles")
    for i, tile in enumerate(tiles.tiles):
        object_keys.check_training_set_key(tile.image_uri, field=f"{field}.tiles[{i}].image_uri")
        object_keys.check_training_set_key(tile.mask_uri, field=f"{field}.tiles[{i}].mask_uri")
    full = trainer_pb2.RunJobRequest()
    full.CopyFrom(request)
    full.tiles.extend(tiles.tiles)
    return full


MAX_MANIFEST_BYTES = 64 * 2**20  # 20,000 tiles with keys of 1,024 characters each


def _validate_analysis(request: trainer_pb2.RunJobRequest) -> None:
    analysis_id = names.parse_name(request.job, names.ANALYSES, field="job")
    v = []
    if request.attempt < 1:
        v.append(FieldViolation("attempt", "must be >= 1"))
    if (request.parallelism.processes or 1) != 1 or (request.parallelism.nodes or 1) != 1:
        v.append(FieldViolation("parallelism", "an analysis runs in one process"))
    if request.tiles:
        v.append(FieldViolation("tiles", "an analysis reads its tiles from analysis.inputs_uri"))
    check(v)
    task = request.analysis
    object_keys.check_analysis_key(task.inputs_uri, analysis_id=analysis_id, field="analysis.inputs_uri")
    object_keys.check_model_key(task.model.weights_uri, field="analysis.model.weights_uri")
    object_keys.check_analysis_attempt_prefix(request.output_prefix, analysis_id=analysis_id,
                                              attempt=request.attempt, field="output_prefix")


# Seconds before a node whose offer could not be worked out tries again (it never gives up: a
# node that serves but is not registered would sit idle, unseen).
OFFER_RETRY_S = 5.0


class Registration(threading.Thread):
    """Registers the node with the pipeline service and heartbeats until stopped."""

    def __init__(self, node: TrainerNode, pipeline_address: str, node_id: str, address: str,
                 offer: Callable[[], NodeOffer], channel: grpc.Channel) -> None:
        super().__init__(name="registration", daemon=True)
        self._node, self._node_id, self._address, self._offer = node, node_id, address, offer
        self._offered: NodeOffer | None = None
        self._stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        self._pipeline_address = pipeline_address
        self.stopping = threading.Event()
        self.registered = threading.Event()

    def run(self) -> None:
        interval = 1.0
        while not self.stopping.is_set():
            try:
                if not self.registered.is_set():
                    offer = self._what_it_offers()
                    self._stub.RegisterTrainerNode(pipeline_pb2.RegisterTrainerNodeRequest(
                        node_id=self._node_id, address=self._address, capacity=self._node.runs.capacity,
                        device=offer.device, job_memory_bytes=offer.job_memory_bytes,
                        max_processes=offer.max_processes), timeout=10)
                    self.registered.set()
                    log.info("registered with the pipeline service at %s as %s", self._pipeline_address,
                             self._node_id)
                interval = self._heartbeat()
            except grpc.RpcError as exc:
                log.warning("pipeline service unreachable (%s); retrying", exc.code())
                interval = 1.0
            except Exception:  # e.g. the device probe timed out on a machine too busy to start torch
                log.exception("could not tell the pipeline service what this node offers; retrying in %.0f s",
                              OFFER_RETRY_S)
                interval = OFFER_RETRY_S
            self.stopping.wait(interval)

    def _what_it_offers(self) -> NodeOffer:
        if self._offered is None:
            self._offered = self._offer()
        return self._offered

    def announce_draining(self) -> None:
        """Tells the pipeline service at once that this node takes no more work."""
        self._node.draining = True
        try:
            self._heartbeat()
        except grpc.RpcError as exc:
            log.warning("could not announce draining (%s)", exc.code())

    def _heartbeat(self) -> float:
        response = self._stub.HeartbeatTrainerNode(pipeline_pb2.HeartbeatTrainerNodeRequest(
            name=names.trainer_node(self._node_id), jobs=self._node.running_jobs(), draining=self._node.draining),
            timeout=10)
        if not response.registered:
            self.registered.clear()
            return 0.0
        for job in response.stop_jobs:
            log.info("pipeline service asks to stop %s", job)
            self._node.cancel(job, stop_early=False)
        return max(0.2, response.heartbeat_interval.ToTimedelta().total_seconds())


def shut_down(node: TrainerNode, registration: Registration, *, grace_s: float) -> None:
    """The node's shutdown policy: hand running jobs back at the next batch. The pipeline service
    re-queues them at once and another node resumes from the last full-state checkpoint. A node
    that dies instead (SIGKILL) loses its lease, and the same happens after the lease period."""
    registration.announce_draining()
    node.hand_back_all(grace_s)
    registration.stopping.set()
