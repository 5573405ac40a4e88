"""One job attempt's worker process, launched by the node through torch.distributed's launcher
(`python -m torch.distributed.run ... -m services.trainer_svc.worker`).

It reads the attempt's RunJobRequest from a file, connects back to its node over an
authenticated local socket (services.trainer_svc.attempts), and runs the executor. Every event
goes to the node, which numbers and serves it; the node's control messages (cancel, stop early,
hand back) set the flags the training loop reads at each batch. Whatever happens to this process
(out of memory, a segfault, `kill -9`), the node survives it and reports the attempt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection
from pathlib import Path

from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from services.common.server import configure_logging
from services.common.settings import ServerSettings, StorageSettings, TrainerSettings
from services.common.storage import ObjectStore
from services.trainer_svc.attempts import AUTHKEY_VARIABLE
from services.trainer_svc.executor import JobExecutor
from services.trainer_svc.tile_source import DiskCache

log = logging.getLogger("segtrain.worker")


class WorkerRun:
    """The executor's view of the attempt (the same fields as the node's JobRun), with events sent
    to the node and control messages from it applied by a reader thread."""

    def __init__(self, job: str, attempt: int, connection: Connection) -> None:
        self.job, self.attempt = job, attempt
        self.cancel_requested = False
        self.stop_early = False
        self.handing_back = False
        self.initialisation = "fresh"
        self.node_lost = False
        self._connection = connection
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read_control, name="control", daemon=True).start()

    def emit(self, event: common_pb2.JobEvent) -> None:
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


def main() -> None:
    """The worker's composition root: the node's own settings (it passes its environment on), the
    attempt's request and the node's socket from the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request", type=Path, required=True, help="serialized RunJobRequest")
    parser.add_argument("--node-socket", required=True, help="the node's socket for this attempt")
    args = parser.parse_args()
    settings, common = TrainerSettings(), ServerSettings()
    configure_logging(common.log_level)
    request = trainer_pb2.RunJobRequest.FromString(args.request.read_bytes())
    device = None if settings.device == "auto" else settings.device
    cache_dir = settings.tile_cache_dir or Path(tempfile.gettempdir()) / "segtrain-tiles"
    cache = DiskCache(cache_dir, settings.tile_cache_mb * 2**20) if settings.tile_cache_mb else None
    executor = JobExecutor(ObjectStore(StorageSettings()), device=device, num_threads=settings.num_threads,
                           progress_interval_s=settings.progress_interval_s,
                           storage_patience_s=settings.storage_patience_s, data_workers=settings.data_workers,
                           prepared_cache_mb=settings.prepared_cache_mb, tile_cache=cache)
    connection = Client(args.node_socket, family="AF_UNIX", authkey=bytes.fromhex(os.environ[AUTHKEY_VARIABLE]))
    watch = MemoryWatch(settings.worker_memory_limit_mb) if settings.worker_memory_limit_mb else None
    if watch is not None:
        watch.start()
    executor.execute(WorkerRun(request.job, request.attempt, connection), request)  # type: ignore[arg-type]
    if watch is not None:
        watch.armed = False
    connection.close()


if __name__ == "__main__":
    main()
