"""`make bench-export`: what exporting a model costs a trainer node, per architecture and format.

Each export runs as the node runs it: in a process of its own (services.trainer_svc.export_worker's
work, without the object store: segcore.export into a scratch folder), on a randomly initialised
model of the architecture with a 512 tile. Reported per export: wall seconds (the parity check
included), the process's peak resident memory (ru_maxrss of the child, which includes torch's
import, about 0.5 GB), the files' size, and the largest logit difference the check found.

    .venv/bin/python bench/export.py [--architectures upernet-convnext-cpu,upernet-convnext-base]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("hf", "onnx", "torchscript")
_CHILD = """
import json, resource, sys
from pathlib import Path
import torch
from segcore import export
from segcore.architectures import build_model
from segcore.checkpoint import ModelMeta
from segcore.intensity import IMAGENET_NORMALIZATION
architecture, fmt, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(2)
model = build_model(architecture, 3).eval()
meta = ModelMeta(architecture=architecture, class_names=["a", "b", "c"],
                 normalization=IMAGENET_NORMALIZATION.to_dict(), tile_size=512)
done = export.export(model, meta, out, fmt)
size = sum((out / name).stat().st_size for name in done.files)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes": size, "difference": done.max_abs_difference, "peak_kb": peak_kb}))
"""


def measure(architecture: str, fmt: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _CHILD, architecture, fmt, folder], cwd=ROOT, check=True,
                              capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"architecture": architecture, "format": fmt, "seconds": round(seconds, 1),
            "peak_rss_mb": round(result["peak_kb"] / 1024),
            "mb": round(result["bytes"] / 2**20, 1), "difference": result["difference"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="upernet-convnext-cpu,upernet-convnextv2-atto,upernet-convnext-base")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-output" / "export.json")
    args = parser.parse_args()
    rows = [measure(a, f) for a in args.architectures.split(",") for f in FORMATS]
    print(f"{'architecture':26} {'format':12} {'seconds':>8} {'peak RSS MB':>12} {'files MB':>9} {'max |diff|':>11}")
    for r in rows:
        difference = "" if r["difference"] is None else f"{r['difference']:.1e}"
        print(f"{r['architecture']:26} {r['format']:12} {r['seconds']:>8} {r['peak_rss_mb']:>12} {r['mb']:>9} "
              f"{difference:>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
