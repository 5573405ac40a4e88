"""Analyses: a registered model predicts masks for uploaded images on a trainer node, in one call."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import PurePosixPath

import grpc
from segtrain.trainer.v1 import trainer_pb2
from sqlalchemy.engine import Engine

from services.common import object_keys
from services.common.database import session_scope
from services.common.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
    check,
)
from services.common.storage import PRESIGNED_URL_LIFETIME, ObjectStore
from services.pipeline_svc import converters
from services.pipeline_svc.domain import AnalysedTile, Analysis
from services.pipeline_svc.resources import models
from services.pipeline_svc.runtime import nodes
from services.pipeline_svc.runtime.peers import PeerStubs, result_unless_abandoned

MAX_IMAGES = 1000
TIMEOUT_S = 600


def analyze_tiles(engine: Engine, store: ObjectStore, peers: PeerStubs, *, model: str, image_keys: list[str],
                  is_active: Callable[[], bool] = lambda: True) -> Analysis:
    """Runs the analysis on a ready node; a caller that gives up (`is_active` false) cancels the
    node's call, which stops the node's work."""
    _check_image_keys(image_keys)
    with session_scope(engine) as session:
        row = models.get_model(session, name=model, field="model")
        ref = converters.model_ref(row)
        candidates = [(n.id, n.address) for n in nodes.ready_nodes(session)]
        class_names = list(row.class_names)
    if not candidates:
        raise UnavailableError("no trainer node is available to run the analysis; try again later")
    analysis_id = uuid.uuid4().hex[:16]
    node_id, address = candidates[hash(analysis_id) % len(candidates)]
    request = trainer_pb2.AnalyzeTilesRequest(model=ref, image_keys=image_keys,
                                              output_prefix=object_keys.analysis_prefix(analysis_id))
    call = peers.trainer(node_id, address).AnalyzeTiles.future(request, timeout=TIMEOUT_S)
    try:
        result: trainer_pb2.AnalyzeTilesResponse = result_unless_abandoned(call, is_active,
                                                                           stopped="the analysis was stopped")
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise InvalidArgumentError.of("image_keys", exc.details() or "bad image") from None
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. the weights fail their sha256 check
            raise FailedPreconditionError(f"{model}: {exc.details()}") from None
        raise UnavailableError(f"trainer node {node_id} could not run the analysis") from None
    return Analysis(analysis_id=analysis_id, trainer_node=node_id, class_names=class_names,
                    tiles=[_tile(t, len(class_names), store) for t in result.tiles])


def _check_image_keys(image_keys: list[str]) -> None:
    v: list[FieldViolation] = []
    if not image_keys:
        v.append(FieldViolation("image_keys", "name at least one image"))
    if len(image_keys) > MAX_IMAGES:
        v.append(FieldViolation("image_keys", f"at most {MAX_IMAGES} images per call"))
    stems: set[str] = set()
    for i, key in enumerate(image_keys):
        try:
            object_keys.check_upload_key(key, field=f"image_keys[{i}]")
        except InvalidArgumentError as exc:
            v += exc.violations
        stem = PurePosixPath(key).stem
        if stem in stems:  # masks are named by stem: a.png and a.tif would overwrite each other
            v.append(FieldViolation(f"image_keys[{i}]", f"duplicate image name {stem!r}"))
        stems.add(stem)
    check(v[:50])


def _tile(t: trainer_pb2.TileResult, num_classes: int, store: ObjectStore) -> AnalysedTile:
    counts = {c.class_index: c.pixel_count for c in t.classes}
    return AnalysedTile(image_key=t.image_key, mask_uri=t.mask_uri,
                        mask_url=store.presign_get(t.mask_uri, PRESIGNED_URL_LIFETIME), width=t.width,
                        height=t.height, class_pixels=[counts.get(i, 0) for i in range(num_classes)])
