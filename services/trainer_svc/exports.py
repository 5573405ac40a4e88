"""ExportModel on a trainer node: one export at a time, each in a process of its own
(services.trainer_svc.export_worker), so that whatever an export does to memory the node and its
jobs survive it. A caller that gives up, or an export past EXPORT_TIMEOUT_S, kills the process."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from segtrain.trainer.v1 import trainer_pb2

from services.common import object_keys
from services.common.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)

EXIT_REFUSED = 3  # the worker's exit code when the model cannot be exported as asked
EXIT_UNAVAILABLE = 4  # ... when the object store failed
EXPORT_TIMEOUT_S = 1800.0  # ONNX export of the largest catalogue model on a CPU takes minutes
_POLL_S = 0.1
_STDERR_TAIL = 4000


class Exporter:
    def __init__(self, env: dict[str, str], *, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        self._env, self._timeout_s = env, timeout_s
        self._busy = threading.Lock()

    def export(self, request: trainer_pb2.ExportModelRequest,
               is_active: Callable[[], bool] = lambda: True) -> trainer_pb2.ExportModelResponse:
        _check(request)
        if not self._busy.acquire(blocking=False):
            raise ResourceExhaustedError("this trainer node is running another export; try another node, or "
                                         "again when it has finished")
        try:
            with tempfile.TemporaryDirectory(prefix="segtrain-export-") as folder:
                return self._run(request, Path(folder), is_active)
        finally:
            self._busy.release()

    def _run(self, request: trainer_pb2.ExportModelRequest, folder: Path,
             is_active: Callable[[], bool]) -> trainer_pb2.ExportModelResponse:
        (folder / "request.pb").write_bytes(request.SerializeToString())
        stderr_path = folder / "stderr.txt"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.trainer_svc.export_worker", "--request", str(folder / "request.pb"),
                 "--response", str(folder / "response.pb"), "--folder", str(folder)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=self._env, start_new_session=True)
            deadline = time.monotonic() + self._timeout_s
            try:
                while process.poll() is None:
                    if not is_active():
                        raise CancelledError("the caller gave up: the export was stopped")
                    if time.monotonic() > deadline:
                        raise UnavailableError(f"the export took more than {self._timeout_s:.0f} s and was stopped")
                    time.sleep(_POLL_S)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        code = process.returncode
        if code == 0:
            return trainer_pb2.ExportModelResponse.FromString((folder / "response.pb").read_bytes())
        output = stderr_path.read_bytes()[-_STDERR_TAIL:].decode(errors="replace").strip()
        last = output.splitlines()[-1] if output else ""
        if code == EXIT_REFUSED:
            raise FailedPreconditionError(last)
        if code == EXIT_UNAVAILABLE:
            raise UnavailableError(last)
        if code == -signal.SIGKILL:
            raise ResourceExhaustedError("the export process was killed (out of memory?); export on a node with "
                                         "more memory")
        raise UnavailableError(f"the export process ended with code {code}: {last[-500:]}")


def _check(request: trainer_pb2.ExportModelRequest) -> None:
    """INVALID_ARGUMENT for a request whose keys or format are not an export's."""
    fmt = object_keys.export_format_name(request.format)
    object_keys.check_model_export_prefix(request.output_prefix, fmt=fmt, field="output_prefix")
    object_keys.check_model_key(request.model.weights_uri, field="model.weights_uri")
    if not request.model.weights_sha256:
        raise InvalidArgumentError.of("model.weights_sha256", "the registered weights' sha256 is required")
