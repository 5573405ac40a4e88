"""One model export in a process of its own, launched by the node (services.trainer_svc.exports):
an ONNX export of a large model takes gigabytes the node's process must not risk.

``python -m services.trainer_svc.export_worker --request R --response S --folder D`` reads a
serialized ExportModelRequest, loads the weights after their sha256 check, exports them into D
(segcore.export, which checks ONNX and TorchScript against torch), uploads each file and then
``manifest.json`` (a ModelExport in protobuf JSON: the export is complete once it exists), and
writes the serialized ExportModelResponse to S. Exit codes: 0; EXIT_REFUSED when the model cannot
be exported as asked (its reason is the last line of stderr); EXIT_UNAVAILABLE when the object
store failed; anything else is a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from google.protobuf import json_format, timestamp_pb2
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import checkpoint, export
from segcore.errors import SegcoreError
from services.common import object_keys
from services.common.errors import DomainError, UnavailableError
from services.common.server import configure_logging
from services.common.settings import ServerSettings, StorageSettings
from services.common.storage import ObjectStore, verified
from services.trainer_svc.exports import EXIT_REFUSED, EXIT_UNAVAILABLE

_CONTENT_TYPES = {".json": "application/json", ".onnx": "application/octet-stream"}


def export_model(store: ObjectStore, request: trainer_pb2.ExportModelRequest, folder: Path
                 ) -> trainer_pb2.ExportModelResponse:
    """Exports the request's model under its output prefix (the node checked the request's keys)."""
    fmt = object_keys.export_format_name(request.format)
    prefix = object_keys.check_model_export_prefix(request.output_prefix, fmt=fmt, field="output_prefix")
    ref = request.model
    data = verified(store.get(ref.weights_uri), key=ref.weights_uri, sha256=ref.weights_sha256)
    model, meta = checkpoint.load_model(data)
    del data
    exported = export.export(model, meta, folder, fmt)
    del model
    store.delete_prefix(prefix)  # what an export that died half-way left
    files = [_upload(store, folder, name, prefix) for name in exported.files]
    shapes = ["x".join(str(n) for n in shape) for shape in exported.checked_shapes]
    created = timestamp_pb2.Timestamp()
    created.GetCurrentTime()
    manifest = pipeline_pb2.ModelExport(model=ref.name, format=request.format, files=files, checked_shapes=shapes,
                                        max_abs_difference=exported.max_abs_difference or 0.0, create_time=created)
    store.put(object_keys.export_manifest(prefix), json_format.MessageToJson(manifest).encode(),
              content_type="application/json")
    return trainer_pb2.ExportModelResponse(files=files, checked_shapes=shapes,
                                           max_abs_difference=manifest.max_abs_difference)


def _upload(store: ObjectStore, folder: Path, name: str, prefix: str) -> common_pb2.ExportedFile:
    path = folder / name
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    size = path.stat().st_size
    with path.open("rb") as f:  # streamed: a model of several GB is never held in memory
        store.put_stream(f"{prefix}{name}", f, size, _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
    return common_pb2.ExportedFile(name=name, uri=f"{prefix}{name}", size_bytes=size, sha256=digest.hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request", type=Path, required=True, help="serialized ExportModelRequest")
    parser.add_argument("--response", type=Path, required=True, help="where to write the ExportModelResponse")
    parser.add_argument("--folder", type=Path, default=None, help="scratch folder for the files")
    args = parser.parse_args()
    configure_logging(ServerSettings())
    request = trainer_pb2.ExportModelRequest.FromString(args.request.read_bytes())
    store = ObjectStore(StorageSettings())
    try:
        with tempfile.TemporaryDirectory(prefix="export-", dir=args.folder) as folder:
            response = export_model(store, request, Path(folder))
    except UnavailableError as exc:
        print(f"the object store is unavailable: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)
    except (SegcoreError, DomainError) as exc:  # the weights fail their check, the export its parity check...
        print(str(exc).replace("\n", " "), file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    args.response.write_bytes(response.SerializeToString())


if __name__ == "__main__":
    main()
