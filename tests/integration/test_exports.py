"""ExportModel on a trainer node against real S3: the export runs in a process of its own and
writes its files and then its manifest; a node runs one export at a time and refuses the next at
once; a caller that leaves, or a killed export process, stops it without harming the node;
weights that fail their sha256 check and keys outside an export are refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import json_format
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import checkpoint
from segcore.architectures import build_model
from segcore.checkpoint import ModelMeta
from segcore.intensity import IMAGENET_NORMALIZATION
from services.common import object_keys
from services.common.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from services.common.settings import StorageSettings, environment
from services.common.storage import ObjectStore
from services.trainer_svc.exports import Exporter

CLASSES = ["background", "cell", "edge"]


@pytest.fixture()
def exporter(s3_settings: StorageSettings) -> Exporter:
    return Exporter({**os.environ, **environment(s3_settings)})


def stored_model(store: ObjectStore) -> tuple[trainer_pb2.ModelRef, str]:
    """A CPU model's weights stored as a job's registered model; its ref and its job id."""
    job = f"j-{uuid.uuid4().hex[:12]}"
    model = build_model("upernet-convnext-cpu", len(CLASSES))
    data = checkpoint.export_model(model.state_dict(), ModelMeta(
        architecture="upernet-convnext-cpu", class_names=CLASSES, normalization=IMAGENET_NORMALIZATION.to_dict(),
        tile_size=64))
    key = object_keys.model_weights(object_keys.attempt_prefix(job, 1), "best")
    store.put(key, data)
    return trainer_pb2.ModelRef(name=f"models/m-{job[2:]}", weights_uri=key, architecture="upernet-convnext-cpu",
                                class_names=CLASSES, weights_sha256=hashlib.sha256(data).hexdigest()), job


def request(ref: trainer_pb2.ModelRef, job: str, fmt: int = common_pb2.EXPORT_FORMAT_ONNX
            ) -> trainer_pb2.ExportModelRequest:
    prefix = object_keys.model_export_prefix(job, object_keys.export_format_name(fmt))
    return trainer_pb2.ExportModelRequest(model=ref, format=fmt, output_prefix=prefix)


def export_processes() -> list[int]:
    """This process's children that run an export (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"services.trainer_svc.export_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def wait_for_export_process(timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := export_processes():
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no export process started")


def test_an_export_writes_its_files_then_a_manifest_that_lists_them(exporter: Exporter, store: ObjectStore) -> None:
    ref, job = stored_model(store)
    req = request(ref, job, common_pb2.EXPORT_FORMAT_HF)
    response = exporter.export(req)
    assert sorted(f.name for f in response.files) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    for file in response.files:
        data = store.get(file.uri)
        assert file.uri == req.output_prefix + file.name and len(data) == file.size_bytes
        assert hashlib.sha256(data).hexdigest() == file.sha256
    manifest = json_format.Parse(store.get(object_keys.export_manifest(req.output_prefix)), pipeline_pb2.ModelExport())
    assert manifest.model == ref.name and list(manifest.files) == list(response.files)
    assert json.loads(store.get(req.output_prefix + "config.json"))["id2label"]["2"] == "edge"
    assert not export_processes()


def test_a_busy_node_refuses_another_export_at_once_and_a_caller_that_leaves_stops_it(
        exporter: Exporter, store: ObjectStore) -> None:
    ref, job = stored_model(store)
    wanted, outcome = threading.Event(), []
    wanted.set()

    def first() -> None:
        try:
            outcome.append(exporter.export(request(ref, job), is_active=wanted.is_set))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    wait_for_export_process()
    started = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match="another export"):
        exporter.export(request(ref, job, common_pb2.EXPORT_FORMAT_HF))
    assert time.monotonic() - started < 1.0, "refused at once, not queued"
    wanted.clear()
    thread.join(10)
    assert not thread.is_alive() and isinstance(outcome[0], CancelledError), outcome
    assert not export_processes(), "the export process was killed"
    assert not store.exists(object_keys.export_manifest(request(ref, job).output_prefix))
    assert exporter.export(request(ref, job, common_pb2.EXPORT_FORMAT_HF)).files, "the node exports again"


def test_a_killed_export_process_fails_the_call_and_the_node_exports_again(exporter: Exporter,
                                                                          store: ObjectStore) -> None:
    ref, job = stored_model(store)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_raised(exporter, request(ref, job))))
    thread.start()
    os.kill(wait_for_export_process(), signal.SIGKILL)
    thread.join(30)
    assert isinstance(outcome[0], ResourceExhaustedError) and "out of memory" in str(outcome[0])
    assert exporter.export(request(ref, job, common_pb2.EXPORT_FORMAT_TORCHSCRIPT)).max_abs_difference <= 1e-3


def _raised(exporter: Exporter, req: trainer_pb2.ExportModelRequest) -> object:
    try:
        return exporter.export(req)
    except Exception as exc:
        return exc


def test_weights_that_fail_their_sha256_check_are_not_exported(exporter: Exporter, store: ObjectStore) -> None:
    ref, job = stored_model(store)
    ref.weights_sha256 = "0" * 64
    with pytest.raises(FailedPreconditionError, match="sha256"):
        exporter.export(request(ref, job, common_pb2.EXPORT_FORMAT_HF))
    assert not store.list_keys(object_keys.model_exports_prefix(job))


@pytest.mark.parametrize(("change", "field"), [
    ({"output_prefix": "jobs/j-1/attempts/1/"}, "output_prefix"),
    ({"output_prefix": "analyses/a-1/exports/onnx/"}, "output_prefix"),
    ({"format": common_pb2.EXPORT_FORMAT_UNSPECIFIED}, "format"),
])
def test_a_request_outside_an_export_is_refused_naming_the_field(
        exporter: Exporter, store: ObjectStore, change: dict[str, object], field: str) -> None:
    ref, job = stored_model(store)
    req = request(ref, job)
    for name, value in change.items():
        setattr(req, name, value)
    with pytest.raises(InvalidArgumentError) as info:
        exporter.export(req)
    assert [v.field for v in info.value.violations] == [field]
    assert not export_processes()


def test_torch_stays_out_of_the_node_process() -> None:
    """The node launches exports; it does not import what they need."""
    code = "import sys, services.trainer_svc.node; print('torch' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "False"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b'{"files": 7}', b"x" * (2 << 20)])
def test_an_unreadable_stored_manifest_counts_as_no_export_so_it_is_made_again(store: ObjectStore,
                                                                               content: bytes) -> None:
    from services.pipeline_svc.runtime.exports import _stored

    prefix = object_keys.model_export_prefix(f"j-{uuid.uuid4().hex[:12]}", "onnx")
    assert _stored(store, prefix) is None
    store.put(object_keys.export_manifest(prefix), content)
    assert _stored(store, prefix) is None
    made = pipeline_pb2.ModelExport(files=[common_pb2.ExportedFile(uri=f"{prefix}model.onnx", size_bytes=3)])
    store.put(object_keys.export_manifest(prefix), json_format.MessageToJson(made).encode())
    assert _stored(store, prefix) == made
