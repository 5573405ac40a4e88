"""Model exports: a model in a format other tools load (segcore.export), made once per format on a
trainer node (the pipeline service has no torch) and kept beside the model's weights until the
model is deleted. A stored export is complete once its manifest exists (the node writes it last);
every call returns fresh presigned URLs of its files.

One call at a time makes a given model's export (services/common/locks.py, across replicas); the
others wait for its manifest. A node that is busy exporting refuses at once and the next ready
node is asked; a caller that gives up stops the node's work."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import timedelta

import grpc
from google.protobuf import json_format
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine

from services.common import object_keys
from services.common.database import session_scope
from services.common.errors import (
    CancelledError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from services.common.locks import exclusive
from services.common.storage import PRESIGNED_URL_LIFETIME, ObjectStore, ObjectTooLargeError
from services.common.timeutil import utcnow
from services.pipeline_svc import converters
from services.pipeline_svc.resources import models
from services.pipeline_svc.runtime import nodes
from services.pipeline_svc.runtime.peers import PeerStubs, result_unless_abandoned

log = logging.getLogger(__name__)

TIMEOUT_S = 1800.0  # the node's own limit (services.trainer_svc.exports) decides first
MAX_MANIFEST_BYTES = 1 << 20
_WAIT_POLL_S = 0.5


def export_model(engine: Engine, store: ObjectStore, peers: PeerStubs, *, name: str, fmt: int,
                 is_active: Callable[[], bool] = lambda: True) -> pb.ModelExport:
    """The model's export to `fmt`, made on a ready node unless it is stored already."""
    fmt_name = object_keys.export_format_name(fmt)
    with session_scope(engine) as session:
        row = models.get_model(session, name=name)
        ref, job_id, model_id = converters.model_ref(row), row.job, row.id
        candidates = [(n.id, n.address) for n in nodes.ready_nodes(session)]
    prefix = object_keys.model_export_prefix(job_id, fmt_name)
    request = trainer_pb2.ExportModelRequest(model=ref, format=fmt, output_prefix=prefix)
    deadline = time.monotonic() + TIMEOUT_S
    while (found := _stored(store, prefix)) is None:
        with exclusive(engine, f"export {model_id} {fmt_name}") as mine:
            if mine:
                found = _stored(store, prefix) or _export_on_a_node(store, peers, candidates, request, is_active)
                break
        # Another call is making it: its export is this one's, or, should it fail, this one tries.
        if not is_active():
            raise CancelledError("the caller gave up waiting for the export another call is making")
        if time.monotonic() > deadline:
            raise UnavailableError("the export another call is making did not finish in time; try again")
        time.sleep(_WAIT_POLL_S)
    return _with_urls(found, store)


def _stored(store: ObjectStore, prefix: str) -> pb.ModelExport | None:
    """The stored export's manifest; None when there is none, or when it cannot be read (it is
    made again then, and the node's new manifest replaces it)."""
    key = object_keys.export_manifest(prefix)
    try:
        return json_format.Parse(store.get(key, max_bytes=MAX_MANIFEST_BYTES), pb.ModelExport(),
                                 ignore_unknown_fields=True)
    except NotFoundError:
        return None
    except (ObjectTooLargeError, json_format.ParseError, ValueError) as exc:
        log.warning("the stored export manifest %s cannot be read (%s): exporting again", key, exc)
        return None


def _export_on_a_node(store: ObjectStore, peers: PeerStubs, candidates: list[tuple[str, str]],
                      request: trainer_pb2.ExportModelRequest, is_active: Callable[[], bool]) -> pb.ModelExport:
    if not candidates:
        raise UnavailableError("no trainer node is available to export the model; try again later")
    random.shuffle(candidates)  # spread exports over the nodes
    for node_id, address in candidates:
        call = peers.trainer(node_id, address).ExportModel.future(request, timeout=TIMEOUT_S)
        try:
            result_unless_abandoned(call, is_active, stopped="the export was stopped")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                continue  # that node is exporting something else (or ran out of memory): ask the next
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPreconditionError(f"{request.model.name} cannot be exported: {exc.details()}") from None
            raise UnavailableError(f"trainer node {node_id} could not export the model "
                                   f"({exc.code().name}: {exc.details()}); try again") from None
        found = _stored(store, request.output_prefix)
        if found is None:
            raise UnavailableError(f"trainer node {node_id} reported an export it did not store; try again")
        return found
    raise UnavailableError("every ready trainer node is busy exporting or could not hold the export in memory; "
                           "try again later")


def _with_urls(found: pb.ModelExport, store: ObjectStore) -> pb.ModelExport:
    export = pb.ModelExport()
    export.CopyFrom(found)
    for file in export.files:
        file.url = store.presign_get(file.uri, PRESIGNED_URL_LIFETIME)
    export.expire_time.FromDatetime(utcnow() + PRESIGNED_URL_LIFETIME - timedelta(minutes=1))
    return export
