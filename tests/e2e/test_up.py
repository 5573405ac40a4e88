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

from clients.stack import LocalStack, free_port, port_holder

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _up(data_dir: Path, port: int, s3_port: int, *, background: bool, extra: tuple[str, ...] = ()
        ) -> subprocess.Popen[str]:
    def ignore_sigint() -> None:  # what `cmd &` in a non-interactive shell does
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port),
         "--s3-port", str(s3_port), "--trainers", "0", *extra],
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


def _serving(up: subprocess.Popen[str], printed: dict[str, str] | None = None) -> bool:
    """Whether `segtrain up` printed its summary (once every process serves); its lines go into
    `printed` ("pipeline" -> the addresses...)."""
    assert up.stdout is not None
    for line in up.stdout:
        key, _, value = line.partition(" ")
        if printed is not None:
            printed[key] = value.strip()
        if key == "credentials":
            return True
    return False


def test_replicas_serve_behind_one_address_list_and_one_dying_goes_unnoticed(tmp_path: Path) -> None:
    """`segtrain up --pipeline-replicas 2 --metrics-replicas 2` (SQLite files the replicas share):
    the printed address lists both pipeline replicas; the CLI given it works, and keeps working
    when the first replica is SIGKILLed (`up` keeps serving with the other); SIGTERM stops every
    child."""
    import json

    up = _up(tmp_path / "stack", free_port(), free_port(), background=False,
             extra=("--pipeline-replicas", "2", "--metrics-replicas", "2"))
    children: list[int] = []
    try:
        printed: dict[str, str] = {}
        assert _serving(up, printed), f"segtrain up exited ({up.wait()})"
        children = _children(up.pid)
        assert len(children) == 5, children  # the S3 server and two replicas of each service
        pipelines, metrics = printed["pipeline"].split(","), printed["metrics"].split(",")
        assert len(pipelines) == len(set(pipelines)) == 2 and len(metrics) == len(set(metrics)) == 2, printed
        token = json.loads(Path(printed["credentials"]).read_text())["viewer"]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "clients.cli.main", "--address", printed["pipeline"],
                                   "--token", token, *args], cwd=REPO, capture_output=True, text=True, timeout=60)

        assert "segmentation" in cli("pipelines", "list").stdout
        first = int(pipelines[0].rsplit(":", 1)[1])
        holder = port_holder(first)
        assert holder is not None and "services.pipeline_svc" in holder, holder
        os.kill(int(holder.split()[1]), signal.SIGKILL)
        while port_holder(first) is not None:
            time.sleep(0.05)
        for _ in range(3):  # every call lands on the survivor
            listed = cli("pipelines", "list")
            assert listed.returncode == 0 and "segmentation" in listed.stdout, listed.stderr
        time.sleep(1.0)  # past `up`'s look at its children: one replica gone is not the stack gone
        assert up.poll() is None, "segtrain up stopped when one of two replicas died"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in children:
            if _alive(child):
                os.kill(child, signal.SIGKILL)
    assert not [c for c in children if _alive(c)], "children left running"


def test_the_cli_works_after_up_from_another_folder_with_no_environment(tmp_path: Path) -> None:
    """`segtrain up` writes the current profile (0600); another shell, anywhere, with no SEGTRAIN_*
    variable but where its config file is, just works. `segtrain login` adds a profile after checking
    it, and refuses a token the stack does not accept, writing nothing."""
    import json
    import stat

    config = tmp_path / "home" / ".config" / "segtrain" / "config.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "clients.cli.main", "up", "--data-dir", str(tmp_path / "stack"), "--port",
         str(free_port()), "--s3-port", str(free_port()), "--trainers", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**_without_segtrain(), "SEGTRAIN_CONFIG": str(config)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bare = {**_without_segtrain(), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}  # finds it itself

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(sys.executable).parent / "segtrain"), *args], cwd=elsewhere, env=bare,
                              capture_output=True, text=True, timeout=60)
    try:
        printed: dict[str, str] = {}
        assert _serving(up, printed), f"segtrain up exited ({up.wait()})"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        listed = cli("pipelines", "list")
        assert listed.returncode == 0 and "segmentation" in listed.stdout, listed.stderr

        credentials = Path(printed["credentials"])
        bad = tmp_path / "bad-token"
        bad.write_text("not-a-token\n")
        refused = cli("login", "--address", printed["pipeline"], "--token-file", str(bad), "--name", "bad")
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        assert "bad" not in json.loads(config.read_text())["profiles"], "a refused login writes nothing"
        logged = cli("login", "--address", printed["pipeline"], "--token-file", str(credentials), "--role",
                     "viewer", "--name", "viewer")
        assert logged.returncode == 0, logged.stderr
        saved = json.loads(config.read_text())
        assert saved["current"] == "viewer" and set(saved["profiles"]) == {"local", "viewer"}
        # The viewer may list but not create; the admin profile (local) may delete what does not exist.
        assert cli("pipelines", "list").returncode == 0
        denied = cli("jobs", "cancel", "jobs/nope")
        assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr, denied.stderr
        assert "NOT_FOUND" in cli("--profile", "local", "jobs", "cancel", "jobs/nope").stderr
        missing = cli("--profile", "nope", "pipelines", "list")
        assert missing.returncode == 2 and "no profile 'nope'" in missing.stderr, missing.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


def _without_segtrain() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEGTRAIN_")}


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
