"""gRPC adapter of the pipeline service: parse the request into domain values, call the service,
convert the result (converters.py). A handful of lines per RPC."""

from __future__ import annotations

from typing import Protocol, TypeAlias, TypedDict

from google.protobuf import empty_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.pipeline.v1 import pipeline_pb2_grpc

from services.common.auth import Role
from services.common.gate import CallState
from services.common.timeutil import to_duration
from services.pipeline_svc import converters
from services.pipeline_svc.service import PipelineService

# Each call's state (services.common.gate.BlockingServicer): whether it is still wanted, and its caller.
Ctx: TypeAlias = CallState

# Minimum role of each RPC (services.common.auth); an RPC missing here is refused.
ACCESS = {f"/segtrain.pipeline.v1.PipelineService/{method}": role for method, role in {
    "ListPipelines": Role.VIEWER, "GetPipeline": Role.VIEWER, "CreatePipeline": Role.ADMIN,
    "ListArchitectures": Role.VIEWER, "CreateUpload": Role.TRAINER, "CreateTrainingSet": Role.TRAINER,
    "GetTrainingSet": Role.VIEWER, "ListTrainingSets": Role.VIEWER, "CreateJob": Role.TRAINER,
    "GetJob": Role.VIEWER, "ListJobs": Role.VIEWER, "StartJob": Role.TRAINER, "CancelJob": Role.TRAINER,
    "CompareJobs": Role.VIEWER, "GetModel": Role.VIEWER, "ListModels": Role.VIEWER,
    # Making an export takes a node's time: a trainer's to ask for.
    "ExportModel": Role.TRAINER,
    "AnalyzeTiles": Role.TRAINER, "CreateAnalysisJob": Role.TRAINER, "GetAnalysisJob": Role.VIEWER,
    "ListAnalysisJobs": Role.VIEWER, "CancelAnalysisJob": Role.TRAINER, "ListAnalysisTiles": Role.VIEWER,
    # A trainer deletes its own only (resources.ownership); an admin any.
    "DeleteTrainingSet": Role.TRAINER, "DeleteJob": Role.TRAINER, "DeleteModel": Role.TRAINER,
    "DeleteAnalysisJob": Role.TRAINER,
    "RegisterTrainerNode": Role.NODE, "HeartbeatTrainerNode": Role.NODE,
    "ListTrainerNodes": Role.ADMIN, "GetServiceInfo": Role.VIEWER,
}.items()}
# Capacity user traffic cannot take (services.common.gate): nodes must stay alive under any load.
RESERVED = {f"/segtrain.pipeline.v1.PipelineService/{m}" for m in ("RegisterTrainerNode", "HeartbeatTrainerNode")}
# Calls that may take minutes, held to SEGTRAIN_MAX_LONG_CALLS of the user capacity.
LONG = {f"/segtrain.pipeline.v1.PipelineService/{m}" for m in ("AnalyzeTiles", "ExportModel")}


class PipelineServicer(pipeline_pb2_grpc.PipelineServiceServicer):
    def __init__(self, service: PipelineService, version: str) -> None:
        self._s = service
        self._version = version

    def ListPipelines(self, request: pb.ListPipelinesRequest, context: Ctx) -> pb.ListPipelinesResponse:
        rows, token = self._s.list_pipelines(page_size=request.page_size, page_token=request.page_token)
        return pb.ListPipelinesResponse(pipelines=[converters.pipeline_message(r) for r in rows], next_page_token=token)

    def GetPipeline(self, request: pb.GetPipelineRequest, context: Ctx) -> pb.Pipeline:
        return converters.pipeline_message(self._s.get_pipeline(request.name))

    def CreatePipeline(self, request: pb.CreatePipelineRequest, context: Ctx) -> pb.Pipeline:
        return converters.pipeline_message(self._s.create_pipeline(converters.pipeline_spec(request)))

    def ListArchitectures(self, request: pb.ListArchitecturesRequest, context: Ctx) -> pb.ListArchitecturesResponse:
        return pb.ListArchitecturesResponse(
            architectures=[converters.architecture_message(a) for a in self._s.list_architectures()])

    def CreateUpload(self, request: pb.CreateUploadRequest, context: Ctx) -> pb.Upload:
        return converters.upload_message(self._s.create_upload(list(request.file_names)))

    def CreateTrainingSet(self, request: pb.CreateTrainingSetRequest, context: Ctx) -> pb.TrainingSet:
        return converters.training_set_message(
            *self._s.create_training_set(converters.training_set_spec(request, _owner(context))))

    def GetTrainingSet(self, request: pb.GetTrainingSetRequest, context: Ctx) -> pb.TrainingSet:
        return converters.training_set_message(*self._s.get_training_set(request.name))

    def ListTrainingSets(self, request: pb.ListTrainingSetsRequest, context: Ctx) -> pb.ListTrainingSetsResponse:
        rows, token = self._s.list_training_sets(**_page_of(request))
        return pb.ListTrainingSetsResponse(training_sets=[converters.training_set_message(r) for r in rows],
                                           next_page_token=token)

    def CreateJob(self, request: pb.CreateJobRequest, context: Ctx) -> pb.Job:
        return converters.job_message(self._s.create_job(converters.job_spec(request, _owner(context))))

    def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.Job:
        return converters.job_message(self._s.get_job(request.name))

    def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        rows, token = self._s.list_jobs(**_page_of(request))
        return pb.ListJobsResponse(jobs=[converters.job_message(r) for r in rows], next_page_token=token)

    def StartJob(self, request: pb.StartJobRequest, context: Ctx) -> pb.Job:
        return converters.job_message(self._s.start_job(request.name, context.principal))

    def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.Job:
        return converters.job_message(self._s.cancel_job(request.name, stop_early=request.stop_early,
                                                          caller=context.principal))

    def CompareJobs(self, request: pb.CompareJobsRequest, context: Ctx) -> pb.JobComparison:
        return converters.comparison_message(self._s.compare_jobs(list(request.jobs)))

    def GetModel(self, request: pb.GetModelRequest, context: Ctx) -> pb.Model:
        return converters.model_message(self._s.get_model(request.name))

    def ListModels(self, request: pb.ListModelsRequest, context: Ctx) -> pb.ListModelsResponse:
        rows, token = self._s.list_models(**_page_of(request))
        return pb.ListModelsResponse(models=[converters.model_message(r) for r in rows], next_page_token=token)

    def ExportModel(self, request: pb.ExportModelRequest, context: Ctx) -> pb.ModelExport:
        # A caller that leaves stops the node's work.
        return self._s.export_model(request.name, request.format, is_active=context.is_active)

    def AnalyzeTiles(self, request: pb.AnalyzeTilesRequest, context: Ctx) -> pb.AnalyzeTilesResponse:
        # A caller that leaves stops the work.
        result = self._s.analyze_tiles(model=request.model, image_keys=list(request.image_keys),
                                       is_active=context.is_active)
        return converters.analysis_message(result)

    def CreateAnalysisJob(self, request: pb.CreateAnalysisJobRequest, context: Ctx) -> pb.AnalysisJob:
        return converters.analysis_job_message(
            self._s.create_analysis(converters.analysis_job_spec(request, _owner(context))))

    def GetAnalysisJob(self, request: pb.GetAnalysisJobRequest, context: Ctx) -> pb.AnalysisJob:
        return converters.analysis_job_message(self._s.get_analysis(request.name), self._s.presign)

    def ListAnalysisJobs(self, request: pb.ListAnalysisJobsRequest, context: Ctx) -> pb.ListAnalysisJobsResponse:
        found, token = self._s.list_analyses(**_page_of(request))
        return pb.ListAnalysisJobsResponse(analysis_jobs=[converters.analysis_job_message(a) for a in found],
                                           next_page_token=token)

    def CancelAnalysisJob(self, request: pb.CancelAnalysisJobRequest, context: Ctx) -> pb.AnalysisJob:
        return converters.analysis_job_message(self._s.cancel_analysis(request.name, context.principal))

    def ListAnalysisTiles(self, request: pb.ListAnalysisTilesRequest, context: Ctx) -> pb.ListAnalysisTilesResponse:
        records, token = self._s.analysis_tiles(request.name, page_token=request.page_token)
        return pb.ListAnalysisTilesResponse(
            tiles=[converters.analysed_tile_message(r, self._s.presign) for r in records], next_page_token=token)

    def DeleteTrainingSet(self, request: pb.DeleteTrainingSetRequest, context: Ctx) -> empty_pb2.Empty:
        self._s.delete_training_set(request.name, context.principal)
        return empty_pb2.Empty()

    def DeleteJob(self, request: pb.DeleteJobRequest, context: Ctx) -> empty_pb2.Empty:
        self._s.delete_job(request.name, context.principal)
        return empty_pb2.Empty()

    def DeleteModel(self, request: pb.DeleteModelRequest, context: Ctx) -> empty_pb2.Empty:
        self._s.delete_model(request.name, context.principal)
        return empty_pb2.Empty()

    def DeleteAnalysisJob(self, request: pb.DeleteAnalysisJobRequest, context: Ctx) -> empty_pb2.Empty:
        self._s.delete_analysis(request.name, context.principal)
        return empty_pb2.Empty()

    def RegisterTrainerNode(self, request: pb.RegisterTrainerNodeRequest, context: Ctx) -> pb.TrainerNode:
        return converters.trainer_node_message(
            self._s.register_node(converters.node_registration(request), context.principal), [])

    def HeartbeatTrainerNode(self, request: pb.HeartbeatTrainerNodeRequest, context: Ctx
                             ) -> pb.HeartbeatTrainerNodeResponse:
        answer = self._s.record_heartbeat(converters.node_heartbeat(request), context.principal)
        return pb.HeartbeatTrainerNodeResponse(heartbeat_interval=to_duration(self._s.heartbeat_interval_s),
                                               stop_jobs=answer.stop_jobs, registered=answer.known)

    def ListTrainerNodes(self, request: pb.ListTrainerNodesRequest, context: Ctx) -> pb.ListTrainerNodesResponse:
        return pb.ListTrainerNodesResponse(
            trainer_nodes=[converters.trainer_node_message(row, jobs) for row, jobs in self._s.list_nodes()])

    def GetServiceInfo(self, request: pb.GetServiceInfoRequest, context: Ctx) -> pb.ServiceInfo:
        return pb.ServiceInfo(metrics_address=self._s.metrics_public_address, version=self._version)


class _PageRequest(Protocol):
    pipeline: str
    owner: str
    page_size: int
    page_token: str


class _PageOf(TypedDict):
    pipeline: str
    owner: str
    page_size: int
    page_token: str


def _page_of(request: _PageRequest) -> _PageOf:
    """The arguments of a List RPC, filtered by pipeline and owner (typed: mypy checks the call)."""
    return {"pipeline": request.pipeline, "owner": request.owner, "page_size": request.page_size,
            "page_token": request.page_token}


def _owner(context: Ctx) -> str:
    """The name of the caller's principal: what resources it creates record as their owner."""
    return context.principal.name if context.principal is not None else ""
