"""Each job attempt in its own process group, launched through torch.distributed's launcher, so
that nothing an attempt does (out of memory, a segfault, `kill -9`) can take down the node, its
other jobs or its heartbeats.

The node listens on an authenticated Unix socket private to the attempt; each of the attempt's
worker processes on this node (services.trainer_svc.worker; `processes` of them, data-parallel)
connects to it. The first local one sends its events, and the node numbers them into the run's
log exactly as if it had trained in-process; the others send only a failure of their own. Cancel,
stop early and hand back go to all of them (the ranks agree at each batch). When the process
group ends without the attempt's final event, the node writes it: a lost worker is handed back
for a retry (the pipeline service counts attempts); the workers themselves report what they can
classify (out of memory, bad data), which is not retried.

Multi-node attempts: node rank 0's launcher hosts the rendezvous store (static rendezvous) on a
port the node reserves for the attempt; the other nodes' launchers join it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from services.common import logs
from services.trainer_svc.runs import JobRun

log = logging.getLogger(__name__)
S = common_pb2
# The secret a worker proves itself with on its node's socket (set in the worker's environment).
AUTHKEY_VARIABLE = "SEGTRAIN_WORKER_AUTHKEY"
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


def launcher_arguments(request: trainer_pb2.RunJobRequest, *, rendezvous: str) -> list[str]:
    """torch.distributed.run's arguments for the attempt's group on this node. One node: a
    standalone rendezvous on a free local port. Several: a static rendezvous at `rendezvous`
    (node rank 0's store), this node at its rank."""
    processes, nodes = max(1, request.parallelism.processes), max(1, request.parallelism.nodes)
    common = ["--nproc-per-node", str(processes), "--max-restarts", "0", "--monitor-interval", "0.5"]
    if nodes == 1:
        return ["--standalone", "--nnodes", "1", *common]
    return ["--nnodes", str(nodes), "--node-rank", str(request.node_rank), "--rdzv-backend", "static",
            "--rdzv-endpoint", rendezvous, "--rdzv-id", f"{request.job.rsplit('/', 1)[-1]}-{request.attempt}",
            *common]


class AttemptProcess:
    """One attempt's worker group on this node and the threads that connect it to its run."""

    def __init__(self, run: JobRun, request: trainer_pb2.RunJobRequest, *, env: dict[str, str],
                 rendezvous: str = "") -> None:
        self.run = run
        self._request = request
        self._env = env
        self.rendezvous = rendezvous
        self._processes = max(1, request.parallelism.processes)
        self._folder = Path(tempfile.mkdtemp(prefix="segtrain-attempt-"))
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(str(self._folder / "node.sock"), family="AF_UNIX", authkey=self._authkey)
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        # A failure another local process reported, used when the reporting one says nothing.
        self._other_outcome: common_pb2.JobFinished | None = None
        # The group's output goes on to the node's; its tail is kept to tell how a worker ended.
        self._output_tail: deque[str] = deque(maxlen=200)

    def start(self) -> None:
        request_path = self._folder / "request.pb"
        request_path.write_bytes(self._request.SerializeToString())
        command = [sys.executable, "-m", "torch.distributed.run",
                   *launcher_arguments(self._request, rendezvous=self.rendezvous),
                   "-m", "services.trainer_svc.worker", "--request", str(request_path),
                   "--node-socket", str(self._folder / "node.sock")]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**self._env, AUTHKEY_VARIABLE: self._authkey.hex()})
        self.run.on_control = self._send_control
        job, attempt = self.run.job, self.run.attempt
        output = threading.Thread(target=self._forward_output, name=f"output-{job}", daemon=True)
        events = threading.Thread(target=logs.in_job(job, attempt, self._accept), name=f"events-{job}", daemon=True)
        for thread in (output, events):
            thread.start()
        threading.Thread(target=logs.in_job(job, attempt, self._supervise), args=(output, events),
                         name=f"attempt-{job}", daemon=True).start()

    def worker_pids(self) -> list[int]:
        """The launcher's children: the attempt's worker processes (Linux /proc)."""
        if self._process is None:
            return []
        children = Path(f"/proc/{self._process.pid}/task/{self._process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        """Ends the whole process group at once (the launcher and every worker)."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)

    def _accept(self) -> None:
        """Connections of the group's local processes, each read by its own thread; returns when
        all have ended (or the group ended before they connected)."""
        readers: list[threading.Thread] = []
        for _ in range(self._processes):
            try:
                connection = self._listener.accept()
            except OSError:  # closed: the group ended before all its workers connected
                break
            with self._lock:
                self._connections.append(connection)
            reader = threading.Thread(target=logs.in_job(self.run.job, self.run.attempt, self._receive_events),
                                      args=(connection,), daemon=True,
                                      name=f"events-{self.run.job}-{len(readers)}")
            reader.start()
            readers.append(reader)
            self._send_control()  # a cancel that came before this worker connected
        for reader in readers:
            reader.join()

    def _receive_events(self, connection: Connection) -> None:
        try:
            hello = connection.recv()
            reporting = hello.get("local_rank") == 0
            while True:
                event = S.JobEvent.FromString(connection.recv_bytes(maxlength=64 * 2**20))
                if reporting or event.HasField("finished"):
                    self._take(event, reporting)
                if event.HasField("finished"):
                    return
        except (EOFError, OSError):
            return  # the worker ended; _supervise reports how

    def _take(self, event: common_pb2.JobEvent, reporting: bool) -> None:
        """One event into the run's log, which ends with one `finished`: the reporting process's,
        or a failure another process reported (a FAILED one at once: the attempt has failed)."""
        with self._emit_lock:
            if self.run.finished:
                return
            if reporting or event.finished.state == S.JOB_STATE_FAILED:
                self.run.emit(event)
            elif self._other_outcome is None:
                self._other_outcome = event.finished

    def _send_control(self) -> None:
        run = self.run
        if not run.cancel_requested:
            return
        message = {"kind": "hand_back"} if run.handing_back else {"kind": "cancel", "stop_early": run.stop_early}
        with self._lock:
            connections = list(self._connections)
        if not connections and not run.finished:
            # Nobody to tell yet: the group is still starting (or waits for a rendezvous that may
            # never complete). Nothing has trained, so the group is ended now.
            log.info("%s: stopping attempt %d before its workers started", run.job, run.attempt)
            self.kill()
        for connection in connections:
            with contextlib.suppress(OSError):  # that worker is gone; _supervise reports the attempt
                connection.send(message)

    def _forward_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            self._output_tail.append(line.decode(errors="replace"))

    def _supervise(self, output: threading.Thread, events: threading.Thread) -> None:
        assert self._process is not None
        code = self._process.wait()
        output.join(timeout=10)
        self._listener.close()  # ends an accept still waiting (the worker never connected)
        events.join(timeout=10)  # the workers' last events, a result among them, are read first
        with self._emit_lock:
            if not self.run.finished:
                self.run.emit(S.JobEvent(finished=self._outcome(code)))
        with self._lock:
            for connection in self._connections:
                connection.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _outcome(self, code: int) -> common_pb2.JobFinished:
        """The attempt's end when its reporting worker could not say it: what another process
        said, else what the launcher saw, and a retry unless a cancel was asked for."""
        if self._other_outcome is not None and self._other_outcome.state != S.JOB_STATE_SUCCEEDED:
            return self._other_outcome
        worker_exit = _worker_exit("".join(self._output_tail))
        seen = f"the worker process ended without a result ({_describe(worker_exit)})"
        log.warning("%s attempt %d: %s; launcher exit %d", self.run.job, self.run.attempt, seen, code)
        if self.run.cancel_requested and not self.run.handing_back:
            return S.JobFinished(state=S.JOB_STATE_CANCELLED, reason=f"cancelled; {seen}")
        return S.JobFinished(state=S.JOB_STATE_QUEUED, reason=f"{seen}; the job is retried from its last checkpoint")


def _worker_exit(output: str) -> int | None:
    """The worker's exit code as the launcher reported it (negative: killed by that signal)."""
    found = _EXIT.findall(output)
    return int(found[-1]) if found else None


def _describe(exit_code: int | None) -> str:
    if exit_code is None:
        return "exit status unknown"
    if exit_code < 0:
        name = signal.Signals(-exit_code).name
        hint = " (killed: out of memory, or by hand)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exit_code}"
