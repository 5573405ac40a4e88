"""`make bench-quality`: does the product learn on every imaging regime users bring?

For each synthetic regime of `segcore.regimes` (8-bit brightfield, dim 16-bit fluorescence, 12-bit in a
16-bit container, float32 with an offset, H&E-like RGB), side by side in one run:
* **product**: a training set and a job through the local stack (S3 server, pipeline, metrics, one
  trainer node), setting only what a user sets (architecture, epochs, batch size, learning rate
  0.001); every other parameter, normalization included, is the product's default. The registered
  model then analyses held-back tiles through AnalyzeTiles;
* **bare**: a plain PyTorch loop (AdamW, cross-entropy, no augmentation, no schedule) on the same
  architecture, seed, training split and epoch budget, with per-image standardisation.
The figure is foreground IoU (the mean over non-background classes of IoU pooled over all held-back
tiles, which neither side saw). Target: product >= bare - 0.01 on every regime.

Prints a table; writes bench-output/quality.json as {"regimes": [{"name", "product_iou", "bare_iou",
"normalization", "product_s", "bare_s", ...}], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "gen"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from segtrain.common.v1 import common_pb2  # noqa: E402
from segtrain.pipeline.v1 import pipeline_pb2 as pb  # noqa: E402

from clients.names import DEFAULT_PIPELINE, TERMINAL  # noqa: E402
from clients.sdk import Client  # noqa: E402
from clients.stack import LocalStack  # noqa: E402
from segcore import imaging, regimes  # noqa: E402
from segcore.architectures import build_model  # noqa: E402
from services.common.settings import TrainerSettings, environment, given  # noqa: E402

OUT = ROOT / "bench-output"
TOLERANCE = 0.01


@dataclass(frozen=True)
class Settings:
    architecture: str
    epochs: int
    batch_size: int
    tiles: int  # in the training set (train + validation split)
    test_tiles: int  # held back: from other source images, seen by neither side
    tile_size: int
    seed: int
    threads: int


@dataclass
class Row:
    name: str
    product_iou: float
    bare_iou: float
    normalization: str
    product_s: float
    bare_s: float
    product_epochs_s: float  # the job's epochs alone (training + validation), from its event log
    normalization_reason: str
    train_tiles: int
    passed: bool


@dataclass(frozen=True)
class Data:
    regime: str
    set_dir: Path
    test_dir: Path
    classes: list[str]


# ------------------------------------------------------------------------------------ data


def write_data(regime: str, s: Settings, root: Path) -> Data:
    """The set and the held-back tiles on disk, as a user would have them (PNG / TIFF files)."""
    tiles = regimes.generate_regime(regime, s.tiles + s.test_tiles, tile_size=s.tile_size, seed=s.seed)
    regimes.write_regime_set(tiles[: s.tiles], root / "set" / "tiles", root / "set" / "masks")
    regimes.write_regime_set(tiles[s.tiles:], root / "test" / "tiles", root / "test" / "masks")
    return Data(regime, root / "set", root / "test", regimes.class_names(regime))


Pairs = list[tuple[str, np.ndarray, np.ndarray]]  # (name, image in native units, mask)


def read_pairs(folder: Path) -> Pairs:
    """(name, image in native units, mask) for every tile of a folder, sorted by name."""
    pairs = []
    for path in sorted((folder / "tiles").iterdir()):
        image = imaging.decode_image(path.read_bytes(), path.name)
        mask_path = folder / "masks" / f"{path.stem}.png"
        mask = imaging.decode_mask(mask_path.read_bytes(), mask_path.name)
        pairs.append((path.stem, image, mask))
    return pairs


def foreground_iou(predictions: list[np.ndarray], truths: list[np.ndarray], num_classes: int) -> float:
    """Mean over classes 1.. of IoU pooled over all tiles (classes absent from both are left out)."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for pred, truth in zip(predictions, truths, strict=True):
        matrix += np.bincount(truth.ravel() * num_classes + pred.ravel(),
                              minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(np.mean([tp[c] / union[c] for c in range(1, num_classes) if union[c]]))


# --------------------------------------------------------------------------------- product


@dataclass(frozen=True)
class Product:
    iou: float
    seconds: float  # StartJob to SUCCEEDED
    epochs_seconds: float
    normalization: str
    reason: str
    train_names: set[str]


def run_product(client: Client, data: Data, tests: Pairs, s: Settings, out: Path) -> Product:
    """The job through the stack, and its model's foreground IoU on the held-back tiles."""
    ts = client.create_training_set(f"quality-{data.regime}", data.set_dir / "tiles", data.set_dir / "masks",
                                    class_names=data.classes, group_by=r"^(.*)_tile")
    job = client.create_job(pipeline=DEFAULT_PIPELINE, training_set=ts.name, hyperparameters=common_pb2.Hyperparameters(
        architecture=s.architecture, epochs=s.epochs, batch_size=s.batch_size, learning_rate=0.001))
    started = time.monotonic()
    client.start_job(job.name)
    done = wait_terminal(client, job.name)
    seconds = time.monotonic() - started
    if done.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{data.regime}: {job.name} ended {common_pb2.JobState.Name(done.state)}: "
                           f"{done.failure_reason}")
    masks_dir = out / data.regime / "product-masks"
    client.analyze(done.model, sorted((data.test_dir / "tiles").iterdir()), masks_dir)
    predictions = [imaging.decode_mask((masks_dir / f"{name}.png").read_bytes(), name) for name, _, _ in tests]
    iou = foreground_iou(predictions, [m for _, _, m in tests], len(data.classes))
    epochs_s = sum(e.epoch_metrics.epoch_time.ToTimedelta().total_seconds() for e in client.watch(job.name)
                   if e.HasField("epoch_metrics"))
    return Product(iou, seconds, epochs_s, done.hyperparameters.normalization, done.normalization_reason,
                   {t.name for t in ts.tiles if not t.validation})


def wait_terminal(client: Client, job: str, timeout: float = 1800) -> pb.Job:
    deadline = time.monotonic() + timeout
    while (current := client.get_job(job)).state not in TERMINAL:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job} did not finish in {timeout:.0f} s")
        time.sleep(0.2)
    return current


# ------------------------------------------------------------------------------- bare loop


def standardised(image: np.ndarray) -> torch.Tensor:
    """Per-image, per-channel standardisation: the baseline's whole intensity handling."""
    pixels = image.astype(np.float32)
    mean = pixels.mean(axis=(0, 1))
    std = pixels.std(axis=(0, 1))
    return torch.from_numpy((pixels - mean) / np.where(std > 0, std, 1.0)).permute(2, 0, 1).contiguous()


def run_bare(data: Data, tests: Pairs, s: Settings, train_names: set[str]) -> tuple[float, float]:
    """(foreground IoU, training seconds) of the plain loop on the product's training split."""
    train = [(standardised(i), torch.from_numpy(m)) for n, i, m in read_pairs(data.set_dir) if n in train_names]
    torch.manual_seed(s.seed)
    model = build_model(s.architecture, len(data.classes))
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.001)
    generator = torch.Generator().manual_seed(s.seed)
    started = time.monotonic()
    model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), s.batch_size):
            batch = order[start : start + s.batch_size]
            if len(batch) < 2:
                continue  # BatchNorm in UperNet's pooling branch cannot train on one sample
            images = torch.stack([train[i][0] for i in batch])
            masks = torch.stack([train[i][1] for i in batch])
            loss = F.cross_entropy(logits_of(model, images), masks, ignore_index=255)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    seconds = time.monotonic() - started
    model.eval()
    with torch.inference_mode():
        predictions = [logits_of(model, standardised(i)[None]).argmax(1)[0].numpy() for _, i, _ in tests]
    return foreground_iou(predictions, [m for _, _, m in tests], len(data.classes)), seconds


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    logits = model(pixel_values=images).logits
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


# ------------------------------------------------------------------------------------ main


def run_regime(client: Client, regime: str, s: Settings, out: Path) -> Row:
    data = write_data(regime, s, out / "data" / regime)
    tests = read_pairs(data.test_dir)  # decoded once, scored by both sides
    p = run_product(client, data, tests, s, out)
    bare_iou, bare_s = run_bare(data, tests, s, p.train_names)
    row = Row(regime, round(p.iou, 4), round(bare_iou, 4), p.normalization, round(p.seconds, 1), round(bare_s, 1),
              round(p.epochs_seconds, 1), p.reason, len(p.train_names), p.iou >= bare_iou - TOLERANCE)
    print(f"  {regime:20} product {p.iou:.4f} ({p.normalization}, {p.seconds:.0f} s, epochs {p.epochs_seconds:.0f} s)"
          f"  bare {bare_iou:.4f} ({bare_s:.0f} s)  {'PASS' if row.passed else 'MISS'}", flush=True)
    return row


def print_table(rows: list[Row], s: Settings) -> None:
    print(f"\nForeground IoU on {s.test_tiles} held-back tiles of {s.tile_size}^2 per regime; {s.architecture}, "
          f"{s.epochs} epochs, batch {s.batch_size}, lr 0.001; target product >= bare - {TOLERANCE}")
    print(f"| {'regime':20} | product | bare   | product - bare | normalization (auto) | product s (epochs) | bare s |")
    print(f"|{'-' * 22}|---------|--------|----------------|----------------------|--------------------|--------|")
    for r in rows:
        print(f"| {r.name:20} | {r.product_iou:.4f}  | {r.bare_iou:.4f} | {r.product_iou - r.bare_iou:+.4f}"
              f"{' PASS' if r.passed else ' MISS':>9} | {r.normalization:20} | "
              f"{r.product_s:7.1f} ({r.product_epochs_s:5.1f})    | {r.bare_s:6.1f} |")


def parse(argv: list[str] | None) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="upernet-convnext-cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=64, help="tiles in each training set (train + validation)")
    parser.add_argument("--test-tiles", type=int, default=24, help="held-back tiles per regime")
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--regimes", default=",".join(regimes.REGIMES))
    a = parser.parse_args(argv)
    chosen = [r for r in a.regimes.split(",") if r]
    unknown = set(chosen) - set(regimes.REGIMES)
    if unknown:
        parser.error(f"unknown regimes {sorted(unknown)}; choose from {', '.join(regimes.REGIMES)}")
    return Settings(a.architecture, a.epochs, a.batch_size, a.tiles, a.test_tiles, a.tile_size, a.seed,
                    a.threads), chosen


def main(argv: list[str] | None = None) -> int:
    settings, chosen = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack's processes are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = OUT / "quality"
    shutil.rmtree(out, ignore_errors=True)  # a fresh stack: sets of an earlier run would collide by name
    torch.set_num_threads(settings.threads)
    started = time.monotonic()
    print(f"bench-quality: {', '.join(chosen)}; {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}, CPU only; {settings}", flush=True)
    env = environment(given(TrainerSettings, num_threads=settings.threads))
    with LocalStack(out / "stack", trainers=1, env_overrides=env) as stack, \
            Client(stack.pipeline_address, token=stack.tokens["trainer"]) as client:
        rows = [run_regime(client, regime, settings, out) for regime in chosen]
    print_table(rows, settings)
    summary = {"regimes": [asdict(r) for r in rows], "settings": asdict(settings),
               "passed": sum(r.passed for r in rows), "missed": sum(not r.passed for r in rows),
               "wall_s": round(time.monotonic() - started, 1)}
    OUT.mkdir(exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{summary['passed']} PASS, {summary['missed']} MISS in {summary['wall_s']:.0f} s; "
          f"bench-output/quality.json written", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
