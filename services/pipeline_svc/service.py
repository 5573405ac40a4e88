"""The pipeline service's facade: owns the engine, object store, remotes, outbox and scheduler,
and exposes one method per use case. Methods return rows; the servicer converts them."""

from __future__ import annotations

import logging
import threading

import grpc
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine

from services.common import names
from services.common.database import session_scope
from services.common.storage import ObjectStore
from services.pipeline_svc import analysis, catalog, comparison, jobs, models, nodes, training_sets, uploads
from services.pipeline_svc.relay import OutboxRelay
from services.pipeline_svc.remote import Remotes
from services.pipeline_svc.scheduler import Scheduler
from services.pipeline_svc.tables import JobRow, ModelRow, PipelineRow, TileRow, TrainerNodeRow, TrainingSetRow

log = logging.getLogger(__name__)


class PipelineService:
    def __init__(self, engine: Engine, store: ObjectStore, remotes: Remotes, *, metrics_public_address: str,
                 schedule_interval_s: float, heartbeat_interval_s: float, max_attempts: int = 5) -> None:
        self.engine, self.store, self.remotes = engine, store, remotes
        self.metrics_public_address = metrics_public_address
        self.heartbeat_interval_s = heartbeat_interval_s
        self.architectures = catalog.Architectures()
        self.outbox = jobs.Outbox()
        self._stopping = threading.Event()
        self.scheduler = Scheduler(engine, remotes, self.outbox, interval_s=schedule_interval_s,
                                   heartbeat_interval_s=heartbeat_interval_s, max_attempts=max_attempts)
        self._outbox_relay = OutboxRelay(engine, remotes, self.outbox, self._stopping)

    def start(self) -> None:
        catalog.seed_defaults(self.engine)
        self.architectures.warm_up()
        self._outbox_relay.start()
        self.scheduler.start()

    def stop(self) -> None:
        self._stopping.set()
        self.outbox.wake.set()
        self.scheduler.stop()

    # Pipelines and architectures
    def list_pipelines(self, page_size: int, page_token: str) -> tuple[list[PipelineRow], str]:
        with session_scope(self.engine) as session:
            return catalog.list_rows(session, page_size, page_token)

    def get_pipeline(self, name: str) -> PipelineRow:
        with session_scope(self.engine) as session:
            return catalog.get_row(session, name)

    def create_pipeline(self, request: pb.CreatePipelineRequest) -> PipelineRow:
        return catalog.create(self.engine, request, self.architectures)

    def list_architectures(self) -> list[catalog.ArchitectureEntry]:
        return self.architectures.entries()

    # Uploads and training sets
    def create_upload(self, file_names: list[str]) -> pb.Upload:
        return uploads.create(self.store, file_names)

    def create_training_set(self, request: pb.CreateTrainingSetRequest) -> tuple[TrainingSetRow, list[TileRow]]:
        row = training_sets.create(self.engine, self.store, request)
        with session_scope(self.engine) as session:
            return row, training_sets.tiles_of(session, row.id)

    def get_training_set(self, name: str) -> tuple[TrainingSetRow, list[TileRow]]:
        with session_scope(self.engine) as session:
            row = training_sets.get_row(session, name)
            return row, training_sets.tiles_of(session, row.id)

    def list_training_sets(self, pipeline: str, page_size: int, page_token: str
                           ) -> tuple[list[TrainingSetRow], str]:
        with session_scope(self.engine) as session:
            return training_sets.list_rows(session, pipeline, page_size, page_token)

    # Jobs
    def create_job(self, request: pb.CreateJobRequest) -> JobRow:
        return jobs.create(self.engine, request, self.architectures, self.outbox)

    def get_job(self, name: str) -> JobRow:
        with session_scope(self.engine) as session:
            return jobs.get_row(session, name)

    def list_jobs(self, pipeline: str, page_size: int, page_token: str) -> tuple[list[JobRow], str]:
        with session_scope(self.engine) as session:
            return jobs.list_rows(session, pipeline, page_size, page_token)

    def start_job(self, name: str) -> JobRow:
        return jobs.start(self.engine, name, self.outbox, self.scheduler.wake)

    def cancel_job(self, name: str, stop_early: bool) -> JobRow:
        job, node_id = jobs.request_cancel(self.engine, name, stop_early, self.outbox)
        if node_id:
            self._tell_node_to_stop(node_id, names.job(job.id), stop_early)
        return job

    def _tell_node_to_stop(self, node_id: str, job_name: str, stop_early: bool) -> None:
        with session_scope(self.engine) as session:
            node = session.get(TrainerNodeRow, node_id)
        if node is None:
            return
        try:
            self.remotes.trainer(node.address).CancelJobRun(
                trainer_pb2.CancelJobRunRequest(job=job_name, stop_early=stop_early), timeout=10)
        except grpc.RpcError as exc:
            # The node learns it at its next heartbeat (stop_jobs) if this call did not reach it.
            log.warning("could not tell node %s to stop %s: %s", node_id, job_name, exc.code())

    def compare_jobs(self, job_names: list[str]) -> pb.JobComparison:
        return comparison.compare(self.engine, self.remotes, job_names)

    # Models and analysis
    def get_model(self, name: str) -> ModelRow:
        with session_scope(self.engine) as session:
            return models.get_row(session, name)

    def list_models(self, pipeline: str, page_size: int, page_token: str) -> tuple[list[ModelRow], str]:
        with session_scope(self.engine) as session:
            return models.list_rows(session, pipeline, page_size, page_token)

    def analyze(self, request: pb.AnalyzeTilesRequest) -> pb.AnalyzeTilesResponse:
        return analysis.analyze(self.engine, self.store, self.remotes, request)

    # Trainer nodes
    def register_node(self, request: pb.RegisterTrainerNodeRequest) -> TrainerNodeRow:
        row = nodes.register(self.engine, request)
        self.scheduler.wake.set()
        return row

    def heartbeat(self, request: pb.HeartbeatTrainerNodeRequest) -> tuple[bool, list[str]]:
        return nodes.heartbeat(self.engine, request)

    def list_nodes(self) -> list[tuple[TrainerNodeRow, list[str]]]:
        with session_scope(self.engine) as session:
            return [(row, [names.job(j.id) for j in nodes.jobs_on(session, row.id)])
                    for row in nodes.list_rows(session)]
