"""Generates the Python protobuf/gRPC code (with .pyi stubs) from protos/ into gen/.

One script, used by `make`, CI and the staleness check: `--check` regenerates into a temporary
folder and fails if gen/ differs, so stale generated code is caught.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated folder a regular package so mypy and setuptools see it.
    for folder in [out / "segtrain", *(p for p in (out / "segtrain").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (out / "segtrain" / "py.typed").touch()


def _differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b)
    diffs = [str(Path(a, n)) for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        diffs += _differences(a / sub, b / sub)
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            stale = _differences(Path(tmp) / "segtrain", GEN / "segtrain") if GEN.exists() else ["gen/"]
        stale = [s for s in stale if "__pycache__" not in s]
        if stale:
            print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    shutil.rmtree(GEN, ignore_errors=True)
    generate(GEN)
    print(f"generated Python code in {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
