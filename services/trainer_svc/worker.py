"""One job attempt's worker process, launched by the node through torch.distributed's launcher
(`python -m torch.distributed.run ... -m services.trainer_svc.worker`).

It reads the attempt's RunJobRequest from a file, joins the attempt's process group when there
are several processes (gloo on CPU, NCCL on CUDA, with an explicit timeout), connects back to its
node over an authenticated local socket (services.trainer_svc.attempts), and runs the executor.
The node's first local process sends every event, which the node numbers and serves; the others
send only their result. The node's control messages (cancel, stop early, hand back) set the
flags the training loop agrees on at each batch. Whatever happens to this process (out of
memory, a segfault, `kill -9`), the node survives it and reports the attempt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from services.common import logs
from services.common.server import configure_logging
from services.common.settings import ServerSettings, StorageSettings, TrainerSettings
from services.common.storage import ObjectStore
from services.trainer_svc.attempts import AUTHKEY_VARIABLE
from services.trainer_svc.tile_source import DiskCache

if TYPE_CHECKING:
    from services.trainer_svc.analysis_job import AnalysisExecutor
    from services.trainer_svc.executor import JobExecutor

log = logging.getLogger("segtrain.worker")


class WorkerRun:
    """The executor's view of the attempt (the same fields as the node's JobRun), with events sent
    to the node and control messages from it applied by a reader thread."""

    def __init__(self, job: str, attempt: int, connection: Connection, *, reporting: bool = True) -> None:
        self.job, self.attempt = job, attempt
        # Only the node's first local process sends everything; the others only their result.
        self._reporting = reporting
        self.cancel_requested = False
        self.stop_early = False
        self.handing_back = False
        self.initialisation = "fresh"
        self.node_lost = False
        self._connection = connection
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read_control, name="control", daemon=True).start()

    def emit(self, event: common_pb2.JobEvent) -> None:
        if not (self._reporting or event.HasField("finished")):
            return
        with self._send_lock:
            if self.node_lost:
                return
            try:
                self._connection.send_bytes(event.SerializeToString())
            except OSError:
                self._lose_node()

    def _read_control(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                self._lose_node()
                return
            kind = message.get("kind")
            if kind == "cancel":
                self.stop_early = self.stop_early or bool(message.get("stop_early"))
                self.cancel_requested = True
            elif kind == "hand_back":
                self.handing_back = self.cancel_requested = True


    def _lose_node(self) -> None:
        """The node is gone (killed, or restarted): nobody can watch or register what this attempt
        makes, so it stops at the next batch; the pipeline re-queues the job when the node's lease
        runs out."""
        if not self.node_lost:
            log.warning("lost the connection to the trainer node; stopping at the next batch")
        self.node_lost = True
        self.cancel_requested = self.handing_back = True


class MemoryWatch(threading.Thread):
    """Holds the worker to SEGTRAIN_TRAINER_WORKER_MEMORY_LIMIT_MB of resident memory: past it,
    the training (on the main thread) gets a MemoryError at its next Python step, which the
    executor reports as out of memory with what to change, instead of the kernel killing the
    process with no reason. Resident memory is sampled every 0.1 s, so one allocation far beyond
    the limit can still reach the kernel's OOM killer first; the node then reports a killed worker.
    (An address-space limit would be exact but counts every thread stack and malloc arena
    reservation, so it fails jobs that fit.)"""

    def __init__(self, limit_mb: int) -> None:
        super().__init__(name="memory-watch", daemon=True)
        self._limit = limit_mb * 2**20
        self.armed = True
        signal.signal(signal.SIGUSR1, self._over_limit)

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while self.armed:
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page
            if resident > self._limit:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(1.0)  # one error per second at most while the stack unwinds
            time.sleep(0.1)

    def _over_limit(self, signum: int, frame: object) -> None:
        if self.armed:
            raise MemoryError(f"resident memory passed the worker's limit of {self._limit // 2**20} MB")


@dataclass(frozen=True)
class Place:
    """Where this process is in the attempt's group (torch.distributed.run's environment)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environment(cls) -> Place:
        value = os.environ.get
        return cls(int(value("RANK", "0")), int(value("LOCAL_RANK", "0")), int(value("WORLD_SIZE", "1")),
                   int(value("LOCAL_WORLD_SIZE", "1")))

    def join(self, device: str | None, timeout_s: float) -> str | None:
        """Joins the group (several processes) and returns this process's device: its own GPU on
        CUDA (NCCL), the CPU otherwise (gloo)."""
        cuda = device != "cpu" and torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if cuda and self.world_size > 1:
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        if self.world_size > 1:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        return device

    def threads(self, configured: int | None) -> int:
        """CPU threads for this process: as configured, else the cores shared by the node's processes."""
        return configured or max(1, (os.cpu_count() or 1) // self.local_world_size)


def main() -> None:
    """The worker's composition root: the node's own settings (it passes its environment on), the
    attempt's request and the node's socket from the command line, its place in the group from
    the launcher's environment."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request", type=Path, required=True, help="serialized RunJobRequest")
    parser.add_argument("--node-socket", required=True, help="the node's socket for this attempt")
    args = parser.parse_args()
    settings, common = TrainerSettings(), ServerSettings()
    configure_logging(common)
    request = trainer_pb2.RunJobRequest.FromString(args.request.read_bytes())
    logs.for_this_process(request.job, request.attempt)
    place = Place.from_environment()
    # CPU convolutions give depthwise weights' gradients strides that differ from DDP's buckets
    # only in a size-1 dimension: the same layout, reported once per process as a "may impair
    # performance" warning.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    connection = Client(args.node_socket, family="AF_UNIX", authkey=bytes.fromhex(os.environ[AUTHKEY_VARIABLE]))
    connection.send({"rank": place.rank, "local_rank": place.local_rank})
    run = WorkerRun(request.job, request.attempt, connection, reporting=place.local_rank == 0)
    watch = MemoryWatch(settings.worker_memory_limit_mb) if settings.worker_memory_limit_mb else None
    if watch is not None:
        watch.start()
    try:
        device = place.join(None if settings.device == "auto" else settings.device, settings.process_group_timeout_s)
        log.info("%s attempt %d: rank %d of %d on %s", request.job, request.attempt, place.rank, place.world_size,
                 device or "the default device")
        executor = (_analyst if request.HasField("analysis") else _executor)(
            settings, device, place.threads(settings.num_threads))
        executor.execute(run, request)  # type: ignore[arg-type]
    finally:
        if watch is not None:
            watch.armed = False
        if dist.is_initialized():
            dist.destroy_process_group()
        connection.close()


def _executor(settings: TrainerSettings, device: str | None, num_threads: int) -> JobExecutor:
    # Imported here, not at the top: every data-loader process (spawned) imports this module, the
    # launcher's `-m` target, as its main module; the training stack (transformers, timm, the
    # architectures) would cost each of them about 240 MB it never uses.
    from services.trainer_svc.executor import JobExecutor, PretrainedPolicy

    cache_dir = settings.tile_cache_dir or Path(tempfile.gettempdir()) / "segtrain-tiles"
    cache = DiskCache(cache_dir, settings.tile_cache_mb * 2**20) if settings.tile_cache_mb else None
    return JobExecutor(ObjectStore(StorageSettings()), device=device, num_threads=num_threads,
                       progress_interval_s=settings.progress_interval_s, storage_patience_s=settings.storage_patience_s,
                       data_workers=settings.data_workers, prepared_cache_mb=settings.prepared_cache_mb,
                       tile_cache=cache, pretrained=PretrainedPolicy.of(settings))


def _analyst(settings: TrainerSettings, device: str | None, num_threads: int) -> AnalysisExecutor:
    from services.trainer_svc.analysis_job import AnalysisExecutor

    return AnalysisExecutor(ObjectStore(StorageSettings()), device=device, num_threads=num_threads,
                            progress_interval_s=settings.progress_interval_s,
                            storage_patience_s=settings.storage_patience_s)


if __name__ == "__main__":
    main()
