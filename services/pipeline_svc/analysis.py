"""Analysis requests: run a registered model on uploaded tiles on a trainer node."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath

import grpc
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine

from services.common import names, object_keys
from services.common.database import session_scope
from services.common.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
    check,
)
from services.common.storage import PRESIGNED_URL_LIFETIME, ObjectStore
from services.pipeline_svc import models, nodes
from services.pipeline_svc.remote import Remotes
from services.pipeline_svc.scheduler import model_ref

MAX_IMAGES = 1000


def analyze(engine: Engine, store: ObjectStore, remotes: Remotes, request: pb.AnalyzeTilesRequest
            ) -> pb.AnalyzeTilesResponse:
    v: list[FieldViolation] = []
    if not request.image_keys:
        v.append(FieldViolation("image_keys", "name at least one image"))
    if len(request.image_keys) > MAX_IMAGES:
        v.append(FieldViolation("image_keys", f"at most {MAX_IMAGES} images per call"))
    stems: set[str] = set()
    for i, key in enumerate(request.image_keys):
        try:
            object_keys.check_upload_key(key, field=f"image_keys[{i}]")
        except InvalidArgumentError as exc:
            v += exc.violations
        stem = PurePosixPath(key).stem
        if stem in stems:  # masks are named by stem: a.png and a.tif would overwrite each other
            v.append(FieldViolation(f"image_keys[{i}]", f"duplicate image name {stem!r}"))
        stems.add(stem)
    check(v[:50])
    with session_scope(engine) as session:
        model = models.get_row(session, request.model, field="model")
        ref = model_ref(model)
        candidates = [(n.id, n.address) for n in nodes.list_rows(session) if n.state == nodes.READY]
        class_names = list(model.class_names)
    if not candidates:
        raise UnavailableError("no trainer node is available to run the analysis; try again later")
    analysis_id = uuid.uuid4().hex[:16]
    node_id, address = candidates[hash(analysis_id) % len(candidates)]
    trainer_request = trainer_pb2.AnalyzeTilesRequest(
        model=ref, image_keys=request.image_keys, output_prefix=object_keys.analysis_prefix(analysis_id))
    try:
        result = remotes.trainer(address).AnalyzeTiles(trainer_request, timeout=600)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise InvalidArgumentError.of("image_keys", exc.details() or "bad image") from None
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. the weights fail their sha256 check
            raise FailedPreconditionError(f"{request.model}: {exc.details()}") from None
        raise UnavailableError(f"trainer node {node_id} could not run the analysis") from None
    return pb.AnalyzeTilesResponse(
        analysis_id=analysis_id, trainer_node=names.trainer_node(node_id),
        tiles=[_tile(t, class_names, store) for t in result.tiles],
    )


def _tile(t: trainer_pb2.TileResult, class_names: list[str], store: ObjectStore) -> pb.TileAnalysis:
    total = max(1, t.width * t.height)
    counts = {c.class_index: c.pixel_count for c in t.classes}
    return pb.TileAnalysis(
        image_key=t.image_key, mask_uri=t.mask_uri, mask_url=store.presign_get(t.mask_uri, PRESIGNED_URL_LIFETIME),
        width=t.width, height=t.height,
        classes=[pb.ClassArea(class_index=i, class_name=name, pixel_count=counts.get(i, 0),
                              fraction=counts.get(i, 0) / total)
                 for i, name in enumerate(class_names)],
    )
