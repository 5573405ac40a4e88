"""The pipeline service's facade: one method per use case, over domain values and rows (see
domain.py). It owns the engine, object store and peer stubs, opens the transactions, and runs
the runtime's threads (scheduler, outbox relay) with one `stopping` event between them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from segtrain.pipeline.v1 import pipeline_pb2 as pb
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from segcore import catalogue
from services.common import names
from services.common.database import lock_name, session_scope
from services.common.errors import AlreadyExistsError, UnavailableError
from services.common.storage import PRESIGNED_URL_LIFETIME, ObjectStore
from services.common.tokens import Principal
from services.pipeline_svc import domain
from services.pipeline_svc.resources import (
    analyses,
    comparison,
    deletion,
    jobs,
    lifecycle,
    lookup,
    models,
    pipelines,
    set_preparation,
    training_sets,
    uploads,
)
from services.pipeline_svc.runtime import analysis, exports, nodes
from services.pipeline_svc.runtime.collector import DEFAULT_COLLECTION, Collection, Collector
from services.pipeline_svc.runtime.outbox_relay import OutboxRelay
from services.pipeline_svc.runtime.peers import PeerStubs
from services.pipeline_svc.runtime.preparer import Preparer
from services.pipeline_svc.runtime.scheduler import Scheduler
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TileRow, TrainerNodeRow, TrainingSetRow

log = logging.getLogger(__name__)


class PipelineService:
    def __init__(self, engine: Engine, store: ObjectStore, peers: PeerStubs, *, metrics_public_address: str,
                 schedule_interval_s: float, heartbeat_interval_s: float, max_attempts: int,
                 prepare_concurrency: int = 2,
                 preparation: set_preparation.Tuning = set_preparation.DEFAULT_TUNING,
                 max_active_jobs_per_principal: int = 0, collection: Collection = DEFAULT_COLLECTION,
                 relay_lease_s: float = 10.0, replica: str | None = None) -> None:
        self.engine, self.store, self.peers = engine, store, peers
        self._active_jobs_quota = max_active_jobs_per_principal
        self.metrics_public_address = metrics_public_address
        self.heartbeat_interval_s = heartbeat_interval_s
        self._stopping = threading.Event()
        self._outbox_relay = OutboxRelay(engine, peers, stopping=self._stopping)
        self.collector = Collector(engine, store, interval_s=collection.interval_s,
                                   upload_ttl_s=collection.upload_ttl_s, orphan_grace_s=collection.orphan_grace_s,
                                   stopping=self._stopping)
        self._preparer = Preparer(engine, store, concurrency=prepare_concurrency, stopping=self._stopping,
                                  tuning=preparation)
        self.scheduler = Scheduler(engine, peers, store, interval_s=schedule_interval_s,
                                   heartbeat_interval_s=heartbeat_interval_s, max_attempts=max_attempts,
                                   stopping=self._stopping, wake_outbox=self._outbox_relay.wake,
                                   relay_lease_s=relay_lease_s, replica=replica)

    def start(self) -> None:
        # Replicas starting together seed in turn: the second finds the pipelines there.
        with session_scope(self.engine, serialized=True) as session:
            lock_name(session, "seed pipelines")
            pipelines.seed_pipelines(session)
        self._outbox_relay.start()
        self._preparer.start()
        self.collector.start()
        self.scheduler.start()

    def stop(self) -> None:
        self._stopping.set()
        self._outbox_relay.wake()
        self._preparer.wake()
        self.scheduler.stop_relays()
        for thread in (self.scheduler, self._outbox_relay, self._preparer, self.collector):
            thread.join(timeout=5)
        try:  # another replica takes this one's relays at its next pass, not when their leases lapse
            self.scheduler.release_leases()
        except Exception:
            log.warning("could not give the relay leases up; they lapse on their own")
        self._preparer.join_running(timeout=5)

    # Pipelines and architectures
    def list_pipelines(self, *, page_size: int, page_token: str) -> tuple[list[PipelineRow], str]:
        with session_scope(self.engine) as session:
            return pipelines.list_pipelines(session, page_size=page_size, page_token=page_token)

    def get_pipeline(self, name: str) -> PipelineRow:
        with session_scope(self.engine) as session:
            return pipelines.get_pipeline(session, name=name)

    def create_pipeline(self, spec: domain.PipelineSpec) -> PipelineRow:
        try:
            with session_scope(self.engine) as session:
                return pipelines.create_pipeline(session, spec=spec, architectures=catalogue.architecture_names())
        except IntegrityError:  # created concurrently: the same request_id's winner, or the id taken
            with session_scope(self.engine) as session:
                previous = lookup.by_request_id(session, table=PipelineRow, request_id=spec.request_id)
                if previous is not None:
                    return pipelines.repeated_pipeline(previous, spec)
            raise AlreadyExistsError(f"{names.pipeline(spec.pipeline_id)} already exists") from None

    def list_architectures(self) -> list[catalogue.ArchitectureInfo]:
        return catalogue.list_architectures()

    # Uploads and training sets
    def create_upload(self, file_names: list[str]) -> domain.UploadGrant:
        return uploads.create_upload(self.store, file_names=file_names)

    def create_training_set(self, spec: domain.TrainingSetSpec) -> tuple[TrainingSetRow, list[TileRow]]:
        """The set, PREPARING (or as an earlier identical request left it); prepared off the request."""
        row, to_prepare = training_sets.create_training_set(self.engine, spec=spec)
        if to_prepare:
            self._preparer.wake()
        with session_scope(self.engine) as session:
            return row, training_sets.tiles_of(session, set_id=row.id)

    def get_training_set(self, name: str) -> tuple[TrainingSetRow, list[TileRow]]:
        with session_scope(self.engine) as session:
            row = training_sets.get_training_set(session, name=name)
            return row, training_sets.tiles_of(session, set_id=row.id)

    def list_training_sets(self, *, pipeline: str, owner: str, page_size: int, page_token: str
                           ) -> tuple[list[TrainingSetRow], str]:
        with session_scope(self.engine) as session:
            return training_sets.list_training_sets(session, pipeline=pipeline, owner=owner, page_size=page_size,
                                                    page_token=page_token)

    # Jobs
    def create_job(self, spec: domain.JobSpec) -> JobRow:
        try:
            with session_scope(self.engine, serialized=True) as session:
                job = jobs.create_job(session, spec=spec, architectures=catalogue.architecture_names())
        except IntegrityError:  # the same request_id, created concurrently: that job is this one's
            with session_scope(self.engine) as session:
                previous = lookup.by_request_id(session, table=JobRow, request_id=spec.request_id)
                if previous is None:
                    raise
                return jobs.repeated_job(previous, spec)
        self._outbox_relay.wake()
        return job

    def get_job(self, name: str) -> JobRow:
        with session_scope(self.engine) as session:
            return jobs.get_job(session, name=name)

    def list_jobs(self, *, pipeline: str, owner: str, page_size: int, page_token: str) -> tuple[list[JobRow], str]:
        with session_scope(self.engine) as session:
            return jobs.list_jobs(session, pipeline=pipeline, owner=owner, page_size=page_size, page_token=page_token)

    def start_job(self, name: str, caller: Principal | None) -> JobRow:
        with session_scope(self.engine, serialized=True) as session:
            job = jobs.start_job(session, name=name, caller=caller, quota=self._active_jobs_quota)
        self._outbox_relay.wake()
        self.scheduler.wake()
        return job

    def cancel_job(self, name: str, *, stop_early: bool, caller: Principal | None, kind: str = jobs.TRAINING
                   ) -> JobRow:
        with session_scope(self.engine, serialized=True) as session:
            job, node_id = jobs.request_cancel(session, name=name, stop_early=stop_early, caller=caller, kind=kind)
        self._outbox_relay.wake()
        if node_id:
            with session_scope(self.engine) as session:
                node = session.get(TrainerNodeRow, node_id)
            if node is not None:
                self.peers.stop_job_on(node.id, node.address, job=lifecycle.log_name(job), stop_early=stop_early)
        return job

    def compare_jobs(self, job_names: list[str]) -> domain.Comparison:
        with session_scope(self.engine) as session:
            chosen = comparison.jobs_to_compare(session, job_names=job_names)
        return comparison.compare_jobs([
            domain.ComparedJob(job=row, training_set_snapshot=snapshot,
                               epochs=self.peers.job_history(names.job(row.id)))
            for row, snapshot in chosen])

    # Models and analysis
    def get_model(self, name: str) -> ModelRow:
        with session_scope(self.engine) as session:
            return models.get_model(session, name=name)

    def list_models(self, *, pipeline: str, owner: str, page_size: int, page_token: str) -> tuple[list[ModelRow], str]:
        with session_scope(self.engine) as session:
            return models.list_models(session, pipeline=pipeline, owner=owner, page_size=page_size,
                                      page_token=page_token)

    def export_model(self, name: str, fmt: int, *, is_active: Callable[[], bool] = lambda: True) -> pb.ModelExport:
        return exports.export_model(self.engine, self.store, self.peers, name=name, fmt=fmt, is_active=is_active)

    def analyze_tiles(self, *, model: str, image_keys: list[str],
                      is_active: Callable[[], bool] = lambda: True) -> domain.Analysis:
        return analysis.analyze_tiles(self.engine, self.store, self.peers, model=model, image_keys=image_keys,
                                      is_active=is_active)

    # Analysis jobs
    def create_analysis(self, spec: domain.AnalysisJobSpec) -> domain.AnalysisJob:
        created = analyses.create_analysis(self.engine, self.store, spec, quota=self._active_jobs_quota)
        self._outbox_relay.wake()
        self.scheduler.wake()
        return created

    def get_analysis(self, name: str) -> domain.AnalysisJob:
        with session_scope(self.engine) as session:
            return analyses.get_analysis(session, name=name)

    def list_analyses(self, *, pipeline: str, owner: str, page_size: int, page_token: str
                      ) -> tuple[list[domain.AnalysisJob], str]:
        with session_scope(self.engine) as session:
            return analyses.list_analyses(session, pipeline=pipeline, owner=owner, page_size=page_size,
                                          page_token=page_token)

    def cancel_analysis(self, name: str, caller: Principal | None) -> domain.AnalysisJob:
        job = self.cancel_job(name, stop_early=False, caller=caller, kind=jobs.ANALYSIS)
        with session_scope(self.engine) as session:
            return analyses.get_analysis(session, name=names.analysis(job.id))

    def analysis_tiles(self, name: str, *, page_token: str) -> tuple[list[dict], str]:  # type: ignore[type-arg]
        """One page of a SUCCEEDED analysis's per-tile records (read from its results in storage)."""
        with session_scope(self.engine) as session:
            found = analyses.get_analysis(session, name=name)
        return analyses.tile_page(self.store, found, page_token)

    # Deletion (resources.deletion): rows in one transaction, then the objects they named.
    def delete_training_set(self, name: str, caller: Principal | None) -> None:
        self._delete(deletion.delete_training_set, name, caller)

    def delete_job(self, name: str, caller: Principal | None) -> None:
        self._delete(deletion.delete_job, name, caller)

    def delete_model(self, name: str, caller: Principal | None) -> None:
        self._delete(deletion.delete_model, name, caller)

    def delete_analysis(self, name: str, caller: Principal | None) -> None:
        self._delete(deletion.delete_analysis, name, caller)

    def _delete(self, rows: Callable[..., list[str]], name: str, caller: Principal | None) -> None:
        with session_scope(self.engine, serialized=True) as session:
            stored = rows(session, name=name, caller=caller)
        self._outbox_relay.wake()  # a deleted job's log is to go too
        for key in stored:
            try:
                if key.endswith("/"):
                    self.store.delete_prefix(key)
                else:
                    self.store.delete_many([key])
            except UnavailableError:  # the resource is gone; its objects are orphans now
                log.warning("%s deleted, but its objects under %s could not be: the object store is unavailable",
                            name, key)

    def presign(self, key: str) -> str:
        """A download URL of one of the service's objects."""
        return self.store.presign_get(key, PRESIGNED_URL_LIFETIME)

    # Trainer nodes
    def register_node(self, registration: domain.NodeRegistration, caller: Principal | None) -> TrainerNodeRow:
        with session_scope(self.engine) as session:
            row = nodes.register_node(session, registration=registration, caller=caller)
        self.scheduler.wake()
        return row

    def record_heartbeat(self, heartbeat: domain.NodeHeartbeat, caller: Principal | None) -> domain.HeartbeatAnswer:
        with session_scope(self.engine) as session:
            return nodes.record_heartbeat(session, heartbeat=heartbeat, caller=caller)

    def list_nodes(self) -> list[tuple[TrainerNodeRow, list[str]]]:
        with session_scope(self.engine) as session:
            return [(row, [lifecycle.log_name(j) for j in nodes.jobs_on_node(session, node_id=row.id)])
                    for row in nodes.list_nodes(session)]
