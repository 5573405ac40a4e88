"""segcore must stay importable without the service stack (the 'pure core' contract)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FORBIDDEN = ("grpc", "sqlmodel", "sqlalchemy", "minio", "google.protobuf", "services", "clients")


def test_importing_every_segcore_module_pulls_in_no_service_dependency() -> None:
    # A fresh interpreter: in this test process other suites may already have imported grpc.
    code = (
        "import sys, pkgutil, importlib, segcore\n"
        "for m in pkgutil.iter_modules(segcore.__path__):\n"
        "    importlib.import_module('segcore.' + m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.startswith({FORBIDDEN!r}))\n"
        "print(bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_errors_module_is_light() -> None:
    # The service layer maps these to status codes; importing them must not load torch.
    code = "import sys, segcore.errors; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
