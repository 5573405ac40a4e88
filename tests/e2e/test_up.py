"""`segtrain up` under a supervisor: every stop signal stops every child, also when it was started
in the background (SIGINT ignored), and a taken port is named with what holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.stack import LocalStack, free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _up(data_dir: Path, port: int, s3_port: int, *, background: bool) -> subprocess.Popen[str]:
    def ignore_sigint() -> None:  # what `cmd &` in a non-interactive shell does
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port),
         "--s3-port", str(s3_port), "--trainers", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=ignore_sigint if background else None)


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(("stop", "background"), [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                                  (signal.SIGINT, True)], ids=["sigterm", "sighup", "sigint-bg"])
def test_every_stop_signal_stops_every_child(tmp_path: Path, stop: signal.Signals, background: bool) -> None:
    port, s3_port = free_port(), free_port()
    up = _up(tmp_path / "stack", port, s3_port, background=background)
    started = [up]
    children: list[int] = []
    try:
        assert _serving(up), f"segtrain up exited ({up.wait()})"
        children = _children(up.pid)
        assert len(children) == 3, children  # the S3 server and two services
        up.send_signal(stop)
        assert up.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "children left running"
        # Its ports are free again: the next `up` starts.
        again = _up(tmp_path / "stack", port, s3_port, background=False)
        started.append(again)
        assert _serving(again), "the next segtrain up did not start"
        children = _children(again.pid)
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    finally:  # a failed test leaves nothing behind either
        for process in started:
            if process.poll() is None:
                process.kill()
        for child in children:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def _serving(up: subprocess.Popen[str]) -> bool:
    """Whether `segtrain up` printed its summary (once every process serves)."""
    assert up.stdout is not None
    return any(line.startswith("credentials") for line in up.stdout)


def test_a_taken_port_is_named_with_what_holds_it(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "clients.cli.main", "up", "--data-dir", str(tmp_path),
                               "--port", str(port), "--s3-port", str(free_port()), "--trainers", "0"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"port {port} (--port) is taken by pid {os.getpid()}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_no_secret_is_on_a_command_line_and_secret_files_are_private(stack: LocalStack) -> None:
    for process in stack.processes.values():
        command = Path(f"/proc/{process.popen.pid}/cmdline").read_bytes()
        for secret in (stack.secret_key, *stack.tokens.values()):
            assert secret.encode() not in command, f"a secret is on {process.name}'s command line"
    assert stack.credentials_file.stat().st_mode & 0o777 == 0o600  # the tokens themselves
    assert stack.tokens_file.stat().st_mode & 0o777 == 0o644  # digests only: a container's user reads them
    for path in (stack.tokens_file, stack.credentials_file):
        assert path.parent.stat().st_mode & 0o777 == 0o700, path.parent
