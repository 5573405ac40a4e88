"""segtrain benchmarks: `make bench` (= `.venv/bin/python bench/run.py`).

Every ratio is measured side by side in this one run; nothing is compared with numbers from
another run. See bench/README.md for what each benchmark measures and its caveats.

    .venv/bin/python bench/run.py                      # all four, full size (~2-3 min on 2 cores)
    .venv/bin/python bench/run.py --quick              # small smoke version (~30 s)
    .venv/bin/python bench/run.py --only training,analysis
    .venv/bin/python bench/run.py --threads 2          # torch threads on both sides (default 1)
    .venv/bin/python bench/run.py --architecture upernet-convnextv2-atto --tiles 32 --epochs 4 --rounds 4
                                                       # a larger model at sizes 2 cores can afford
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "gen"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import grpc  # noqa: E402
from segtrain.common.v1 import common_pb2  # noqa: E402
from segtrain.metrics.v1 import metrics_pb2  # noqa: E402
from segtrain.pipeline.v1 import pipeline_pb2 as pb  # noqa: E402
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc  # noqa: E402

from clients.names import DEFAULT_PIPELINE, TERMINAL  # noqa: E402
from clients.sdk import Client  # noqa: E402
from clients.stack import LocalStack  # noqa: E402
from segcore import synthetic  # noqa: E402 - numpy + pillow only; torch stays in the workers
from services.common import object_keys  # noqa: E402
from services.common.settings import TrainerSettings, environment, given  # noqa: E402

BENCHMARKS = ("training", "datapath", "analysis", "watch")
OUT = ROOT / "bench-output"
ARCHITECTURE = "upernet-convnext-cpu"  # default of --architecture
SEED = 11  # synthetic tiles

BUSY_CORES = 0.3  # outside load (cores) above which a benchmark's figures are flagged as disturbed
TARGETS = {
    "training": ("training images/s, trainer node / bare loop", ">=", 0.95),
    "datapath": ("data path tiles/s / model consumption images/s", ">=", 5.0),
    "analysis": ("analysis tiles/s, product / bare forward", ">=", 0.95),
    "watch_latency": ("event latency p99 (ms), trainer emit -> watcher receive", "<=", 50.0),
    "watch_cost": ("training slowdown with the watchers (%)", "<=", 2.0),
}


@dataclass(frozen=True)
class Sizes:
    train_tiles: int  # benchmark 1's training set (before the train/validation split)
    tile_size: int
    epochs: int  # per run; epoch 1 is warm-up and excluded
    rounds: int  # benchmark 1: rounds of (bare loop, segcore.train(), job)
    batch_size: int
    analysis_tiles: int
    repeats: int  # timed repetitions (median reported)
    watch_tiles: int
    watch_tile_size: int
    watch_epochs: int
    watchers: int
    cost_epochs: int
    cost_rounds: int  # benchmark 4b: rounds of jobs A B B A (A without, B with watchers)


FULL = Sizes(train_tiles=64, tile_size=128, epochs=7, rounds=6, batch_size=8, analysis_tiles=32, repeats=7,
             watch_tiles=8, watch_tile_size=64, watch_epochs=30, watchers=200, cost_epochs=8, cost_rounds=3)
QUICK = Sizes(train_tiles=16, tile_size=64, epochs=3, rounds=1, batch_size=8, analysis_tiles=8, repeats=2,
              watch_tiles=8, watch_tile_size=64, watch_epochs=5, watchers=20, cost_epochs=3, cost_rounds=1)


class Worker:
    """A persistent `bench/worker.py serve` process: one request and one answer per line."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def call(self, command: str, spec: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "worker.py"), "serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                          env=_worker_env())
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"command": command, "spec": spec}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {command} died (exit {self._proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


@dataclass
class Context:
    sizes: Sizes
    threads: int
    architecture: str  # of every job and worker-side model (benchmarks 1, 3, 4; 2's consumption rate)
    quick: bool
    stack: LocalStack
    client: Client
    data: Path
    sets: dict[str, pb.TrainingSet] = field(default_factory=dict)
    bare_rate: float | None = None  # bare-loop training images/s (benchmark 1)
    trainer_worker: Worker = field(default_factory=Worker)  # bare loop and segcore.train()
    model: str = ""  # a registered model (benchmark 1's job)
    outside: OutsideLoad | None = None  # started when the current benchmark started

    def outside_cores(self) -> float:
        return round(self.outside.cores(), 3) if self.outside else float("nan")

    def s3_spec(self) -> dict[str, str]:
        return {"s3_endpoint": self.stack.s3_endpoint, "access_key": self.stack.access_key,
                "secret_key": self.stack.secret_key}


# ----------------------------------------------------------------------------- helpers


def stack_token(stack: LocalStack, role: str) -> str:
    """The local stack's bearer token for a role ("" when the stack has no authentication)."""
    return str(getattr(stack, "tokens", {}).get(role, ""))


def auth_metadata(stack: LocalStack, role: str) -> list[tuple[str, str]]:
    token = stack_token(stack, role)
    return [("authorization", f"Bearer {token}")] if token else []


def connect(stack: LocalStack, role: str) -> Client:
    """An SDK client of the stack with the role's token: admin for the driver, viewer for watchers."""
    token = stack_token(stack, role)
    return Client(stack.pipeline_address, token=token) if token else Client(stack.pipeline_address)


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(key: str, value: float, outside_load: float) -> dict[str, Any]:
    """PASS/MISS against the target; `disturbed` when other users kept the machine busy meanwhile."""
    what, op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return {"metric": what, "value": round(value, 4), "target": f"{op} {target}", "pass": bool(ok),
            "disturbed": bool(outside_load > BUSY_CORES)}


def _load_line(load: float) -> str:
    return (f"{load:.2f} cores busy with other users' work on average"
            + (" -- DISTURBED: figures unreliable" if load > BUSY_CORES else ""))


def print_table(title: str, rows: list[tuple[str, str]], result: dict[str, Any] | None = None) -> None:
    result = result or {}
    if "outside_load_cores" in result:
        rows = [*rows, ("outside load", _load_line(result["outside_load_cores"]))]
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n{'-' * len(title)}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for v in result.get("verdicts", []):
        print(f"  => {'PASS' if v['pass'] else 'MISS'}: {v['metric']} = {v['value']:g} (target {v['target']})"
              + ("  [DISTURBED run: other users' load; repeat on a quiet machine]" if v["disturbed"] else ""))
    sys.stdout.flush()


def worker(command: str, spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Runs bench/worker.py in its own process and returns its JSON result."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "worker.py"), command], input=json.dumps(spec) + "\n",
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_worker_env())
    if proc.returncode != 0:
        raise RuntimeError(f"worker {command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def training_set(ctx: Context, key: str, count: int, tile_size: int) -> pb.TrainingSet:
    """A training set of `count` synthetic tiles (4 per source image, grouped), created once."""
    if key not in ctx.sets:
        tiles = synthetic.generate_tiles(count, tile_size=tile_size, seed=SEED)
        folder = ctx.data / key
        synthetic.write_tile_set(tiles, folder / "tiles", folder / "masks")
        created = ctx.client.create_training_set(f"bench-{key}", folder / "tiles", folder / "masks",
                                                 class_names=synthetic.CLASS_NAMES, group_by=r"^(.*)_tile")
        ctx.sets[key] = ctx.client.pipeline.GetTrainingSet(pb.GetTrainingSetRequest(name=created.name), timeout=30)
    return ctx.sets[key]


def hyperparameters(ctx: Context, epochs: int) -> common_pb2.Hyperparameters:
    # loss "ce" to match the bare loop (the product default is ce+dice); augmentation on, as the
    # product default; no crops (whole tiles), checkpoint after every epoch (the default).
    return common_pb2.Hyperparameters(architecture=ctx.architecture, epochs=epochs, batch_size=ctx.sizes.batch_size,
                                      learning_rate=0.001, weight_decay=0.01, seed=0, augment=True, loss="ce")


def create_job(ctx: Context, ts: pb.TrainingSet, epochs: int) -> pb.Job:
    return ctx.client.create_job(pipeline=DEFAULT_PIPELINE, training_set=ts.name,
                                 hyperparameters=hyperparameters(ctx, epochs))


def wait_terminal(ctx: Context, job: str, timeout: float = 300) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        current = ctx.client.get_job(job)
        if current.state in TERMINAL:
            if current.state != common_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"{job} ended {common_pb2.JobState.Name(current.state)}: {current.failure_reason}")
            return current
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job} still {common_pb2.JobState.Name(current.state)} after {timeout:.0f} s")
        time.sleep(0.5)


def job_events(ctx: Context, job: str) -> list[common_pb2.JobEvent]:
    events: list[common_pb2.JobEvent] = []
    while True:
        page = ctx.client.metrics.ListJobEvents(metrics_pb2.ListJobEventsRequest(
            job=job, after_seq=events[-1].seq if events else 0, page_size=1000), timeout=30)
        events += page.events
        if not page.events or events[-1].seq >= page.last_seq:
            return events


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OutsideLoad:
    """How much CPU the rest of the machine used while a benchmark ran: all busy CPU time
    (/proc/stat) minus that of this process tree (the stack, the workers, the watchers)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, int, int]:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, own + waited-for children's ticks)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            stats[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            ours += stats.get(pid, (0, 0))[1]
            todo += children.get(pid, [])
        return time.monotonic(), busy, ours

    def cores(self) -> float:
        """Average number of cores the rest of the machine kept busy since construction."""
        t1, busy1, ours1 = self._sample()
        t0, busy0, ours0 = self._start
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / ticks / max(t1 - t0, 1e-9))


def stack_cpu(ctx: Context) -> dict[str, float]:
    return {name: process_cpu_s(p.popen.pid) for name, p in ctx.stack.processes.items()}


@dataclass
class JobOutcome:
    job: pb.Job
    events: list[common_pb2.JobEvent]
    cpu_s: dict[str, float]  # CPU seconds each stack process used from StartJob to the final state
    wall_s: float


def run_job(ctx: Context, ts: pb.TrainingSet, epochs: int, job: pb.Job | None = None) -> JobOutcome:
    """Creates (unless given), starts and waits for a job; returns it, its event log and the CPU
    time each process of the stack spent meanwhile."""
    job = job or create_job(ctx, ts, epochs)
    before, started = stack_cpu(ctx), time.monotonic()
    ctx.client.start_job(job.name)
    done = wait_terminal(ctx, job.name)
    wall, after = time.monotonic() - started, stack_cpu(ctx)
    return JobOutcome(done, job_events(ctx, job.name), {k: after[k] - before[k] for k in before}, wall)


def mean_cpu(outcomes: list[JobOutcome]) -> dict[str, float]:
    return {k: round(statistics.mean(o.cpu_s[k] for o in outcomes), 2) for k in outcomes[0].cpu_s}


def epoch_rates(events: list[common_pb2.JobEvent], train_tiles: int) -> dict[int, float]:
    """Training images/s per epoch: train tiles / (PHASE_VALIDATING - PHASE_TRAINING event_time),
    both stamped by the trainer node. Epoch 1 (warm-up) is left out."""
    starts: dict[int, float] = {}
    rates: dict[int, float] = {}
    for e in events:
        if not e.HasField("phase_change") or e.attempt < 1:
            continue
        t = e.event_time.seconds + e.event_time.nanos / 1e9
        if e.phase_change.phase == common_pb2.PHASE_TRAINING:
            starts[e.progress.epoch] = t
        elif e.phase_change.phase == common_pb2.PHASE_VALIDATING and e.progress.epoch in starts:
            rates[e.progress.epoch] = train_tiles / (t - starts[e.progress.epoch])
    return {epoch: r for epoch, r in sorted(rates.items()) if epoch > 1}


def train_spec(ctx: Context, ts: pb.TrainingSet, epochs: int) -> dict[str, Any]:
    s = ctx.sizes
    return {"threads": ctx.threads, "tiles": s.train_tiles, "tile_size": s.tile_size, "seed": SEED,
            "train_names": [t.name for t in ts.tiles if not t.validation],
            "val_names": [t.name for t in ts.tiles if t.validation], "batch_size": s.batch_size,
            "architecture": ctx.architecture, "class_names": synthetic.CLASS_NAMES,
            "num_classes": len(synthetic.CLASS_NAMES), "learning_rate": 0.001, "weight_decay": 0.01, "epochs": epochs}


def worker_rates(command: str, ctx: Context, ts: pb.TrainingSet, epochs: int) -> dict[str, Any]:
    """bare-train or core-train in the persistent worker process; images/s per epoch, epoch 1 of
    each run left out (as for jobs)."""
    result = ctx.trainer_worker.call(command, train_spec(ctx, ts, epochs))
    result["rates"] = [result["tiles"] / t for t in result["epoch_s"][1:]]
    # Share of its threads' wall time the process got the CPU: < 1 when others took the cores.
    result["cpu_share"] = [c / w / ctx.threads for c, w in zip(result["epoch_cpu_s"][1:], result["epoch_s"][1:],
                                                                 strict=True)]
    return result


def fmt_rates(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {median(values):7.1f}  min {min(values):7.1f}  max {max(values):7.1f}  (n={len(values)})"


# ----------------------------------------------------------------------------- 1. training


def _training_order(rounds: int) -> list[str]:
    # Short runs, interleaved and mirrored (bare core job, job core bare, ...), so load from other
    # users of the machine hits every side alike and a linear drift cancels.
    return [arm for r in range(rounds) for arm in (("bare", "core", "job"), ("job", "core", "bare"))[r % 2]]


@dataclass
class TrainingRuns:
    """Benchmark 1's measurements, arm by arm (bare, core, job) and round by round."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {"bare": [], "core": [], "job": []})
    shares: dict[str, list[float]] = field(default_factory=lambda: {"bare": [], "core": []})  # worker CPU share
    batches: list[int] = field(default_factory=list)  # the bare loop's batch sizes
    jobs: list[JobOutcome] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)  # per round: median images/s of each arm

    def run(self, ctx: Context, ts: pb.TrainingSet, arm: str) -> None:
        """One run of `arm`; its epoch rates go to the arm and its median to the current round."""
        if arm == "job":
            outcome = run_job(ctx, ts, ctx.sizes.epochs)
            self.jobs.append(outcome)
            run_rates = list(epoch_rates(outcome.events, ts.train_tile_count).values())
        else:
            result = worker_rates(f"{arm}-train", ctx, ts, ctx.sizes.epochs)
            run_rates = result["rates"]
            self.shares[arm] += result["cpu_share"]
            self.batches = result.get("batches", self.batches)
        self.rates[arm] += run_rates
        self.rounds[-1][arm] = median(run_rates)

    def round_ratios(self, numerator: str, denominator: str) -> list[float]:
        return [r[numerator] / r[denominator] for r in self.rounds]


def _run_training_arms(ctx: Context, ts: pb.TrainingSet, order: list[str]) -> TrainingRuns:
    runs = TrainingRuns()
    for i, arm in enumerate(order):
        if i % 3 == 0:
            runs.rounds.append({})
        runs.run(ctx, ts, arm)
    return runs


@dataclass(frozen=True)
class TrainingFigures:
    """Benchmark 1's figures from its runs (unrounded; rounding is for the JSON summary only)."""

    product: float  # median images/s of each side
    core: float
    bare: float
    round_ratios: list[float]  # job / bare per round
    round_core: list[float]  # core / bare per round
    round_node: list[float]  # job / core per round
    ratio: float  # the verdict's figure

    @classmethod
    def of(cls, runs: TrainingRuns) -> TrainingFigures:
        # The verdict uses the median of per-round ratios: each round's runs are seconds apart, so a
        # burst of outside load that hits one round moves one ratio, not the pooled medians.
        round_ratios = runs.round_ratios("job", "bare")
        product, core, bare = (median(runs.rates[k]) for k in ("job", "core", "bare"))
        return cls(product, core, bare, round_ratios, runs.round_ratios("core", "bare"),
                   runs.round_ratios("job", "core"), median(round_ratios))


def bench_training(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ts = training_set(ctx, "train", s.train_tiles, s.tile_size)
    order = _training_order(s.rounds)
    log(f"training: {' '.join(order)} ({s.epochs} epochs each; bare and core in their own process while "
        "the stack is idle)")
    runs = _run_training_arms(ctx, ts, order)
    job = runs.jobs[-1].job
    parts = ctx.trainer_worker.call("core-parts", train_spec(ctx, ts, s.epochs))["ms_per_epoch"]
    figures = TrainingFigures.of(runs)
    ctx.bare_rate, ctx.model = figures.bare, job.model
    result = _training_result(ctx, ts, order, job, runs, figures, parts)
    _print_training(ctx, ts, order, runs, figures, parts, result)
    return result


def _training_result(ctx: Context, ts: pb.TrainingSet, order: list[str], job: pb.Job, runs: TrainingRuns,
                     figures: TrainingFigures, parts: dict[str, float]) -> dict[str, Any]:
    s, f, rates = ctx.sizes, figures, runs.rates
    return {
        "architecture": ctx.architecture, "train_tiles": ts.train_tile_count, "tile_size": s.tile_size,
        "batch_size": s.batch_size, "epochs": s.epochs, "rounds": s.rounds, "threads": ctx.threads,
        "batches": runs.batches, "order": order, "job": job.name,
        "product_images_per_s": round(f.product, 2), "core_images_per_s": round(f.core, 2),
        "bare_images_per_s": round(f.bare, 2), "ratio": round(f.ratio, 4),
        "ratio_of_medians": round(f.product / f.bare, 4),
        "round_ratios": [round(r, 4) for r in f.round_ratios], "core_ratio": round(median(f.round_core), 4),
        "node_ratio": round(median(f.round_node), 4),
        "epoch_rates": {k: [round(r, 2) for r in v] for k, v in rates.items()},
        "cpu_share_median": {k: round(median(v), 3) for k, v in runs.shares.items()},
        "core_extra_ms_per_epoch": {k: round(v, 2) for k, v in parts.items()},
        "epoch_ms": {k: round(1000 * ts.train_tile_count / median(v), 1) for k, v in rates.items()},
        "job_cpu_s": mean_cpu(runs.jobs), "job_wall_s": round(statistics.mean(o.wall_s for o in runs.jobs), 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "outside_load_cores": (load := ctx.outside_cores()),
        "verdicts": [verdict("training", f.ratio, load)],
    }


def _print_training(ctx: Context, ts: pb.TrainingSet, order: list[str], runs: TrainingRuns,
                    figures: TrainingFigures, parts: dict[str, float], result: dict[str, Any]) -> None:
    s, f, rates, shares = ctx.sizes, figures, runs.rates, runs.shares
    print_table("1. training: images/s through the trainer node vs a bare PyTorch loop", [
        ("setup", f"{ctx.architecture}, {ts.train_tile_count} train tiles of {s.tile_size}^2 (batches "
                  f"{runs.batches}), {s.epochs} epochs per run, epoch 1 excluded, runs in the order {' '.join(order)}"),
        ("threads", f"torch {ctx.threads} on all sides (SEGTRAIN_TRAINER_NUM_THREADS / torch.set_num_threads)"),
        ("job", "through the trainer node: AdamW, loss ce, augment on (product default), whole tiles; "
                "PHASE_TRAINING -> PHASE_VALIDATING event_time"),
        ("core", "segcore.training.train() in its own process, same config, no services (attribution)"),
        ("bare", "own process, stack idle: forward + CE + backward + AdamW step on pre-built tensors"),
        ("job images/s", fmt_rates(rates["job"])),
        ("core images/s", fmt_rates(rates["core"])),
        ("bare images/s", fmt_rates(rates["bare"])),
        ("epoch ms (median)", ", ".join(f"{k} {v:.0f}" for k, v in result["epoch_ms"].items())),
        ("core / bare", f"{median(f.round_core):.3f}  (segcore's own overhead: augmentation, loss, IoU "
                        "bookkeeping; median of per-round ratios)"),
        ("  core extras, ms/epoch", ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
         + "  (timed apart, same threads)"),
        ("job / core", f"{median(f.round_node):.3f}  (the node and the services around it)"),
        ("CPU share received", f"bare {median(shares['bare']):.2f}, core {median(shares['core']):.2f} (CPU time / "
                               "wall time / threads per epoch; < 1 = other processes took the cores)"),
        ("stack CPU s per job", _cpu_line(result["job_cpu_s"], result["job_wall_s"])
         + f"  ({s.epochs} epochs incl. validation, checkpoints)"),
        ("load average", f"{result['loadavg']} (1, 5, 15 min) at the end"),
        ("job / bare per round", " ".join(f"{r:.3f}" for r in f.round_ratios)),
        ("ratio job / bare", f"{f.ratio:.4f}  (median of the per-round ratios; ratio of the pooled medians "
                             f"{f.product / f.bare:.4f})"),
    ], result)


# ----------------------------------------------------------------------------- 2. data path


def bench_datapath(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ts = training_set(ctx, "train", s.train_tiles, s.tile_size)
    if ctx.bare_rate is None:
        log("datapath: no training benchmark in this run; measuring the bare loop's consumption rate")
        ctx.bare_rate = median(worker_rates("bare-train", ctx, ts, max(3, s.epochs // 2))["rates"])
    log("datapath: object storage -> decoded, augmented batches")
    spec = {**ctx.s3_spec(), "threads": ctx.threads, "num_classes": len(synthetic.CLASS_NAMES),
            "batch_size": s.batch_size, "repeats": s.repeats,
            "tiles": [{"name": t.name, "image_uri": t.image_uri, "mask_uri": t.mask_uri} for t in ts.tiles]}
    r = worker("datapath", spec)
    n = r["tiles"]
    chain = [n / c["total"] for c in r["chains"]]
    augment_only = [n / c["augment_batch"] for c in r["chains"]]
    part = {k: median([c[k] for c in r["chains"]]) for k in ("fetch_decode", "normalise", "augment_batch")}
    ratio = median(chain) / ctx.bare_rate
    result = {
        "tiles": n, "threads": ctx.threads, "datapath_tiles_per_s": round(median(chain), 1),
        "epoch_augment_tiles_per_s": round(median(augment_only), 1),
        "consumption_images_per_s": round(ctx.bare_rate, 2), "consumption_architecture": ctx.architecture,
        "ratio": round(ratio, 2),
        "chain_seconds": {k: round(v, 4) for k, v in part.items()},
        "stage_ms_per_tile": {k: round(v, 3) for k, v in r["stage_ms_per_tile"].items()},
        "outside_load_cores": (load := ctx.outside_cores()),
        "verdicts": [verdict("datapath", ratio, load)],
    }
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_ms_per_tile"].items())
    print_table("2. datapath: object storage -> decoded, augmented batch vs the model's consumption", [
        ("setup", f"{n} tiles of {s.tile_size}^2 + masks from the stack's S3 (rclone serve s3), "
                  f"torch threads {ctx.threads}, {s.repeats} repeats after a warm-up"),
        ("chain", "ObjectStore.get + decode_image/decode_mask on 8 threads (as the trainer), normalise, "
                  "one epoch of augmented batches"),
        ("chain seconds", ", ".join(f"{k} {v:.3f}" for k, v in part.items())),
        ("data path tiles/s", fmt_rates(chain)),
        ("augment+batch alone", fmt_rates(augment_only) + f"  (the only per-epoch part: "
                                f"{median(augment_only) / ctx.bare_rate:.0f}x consumption)"),
        ("stage ms/tile (1 thread)", stages),
        ("consumption images/s", f"{ctx.bare_rate:.1f} (bare training loop of {ctx.architecture}, benchmark 1)"),
        ("ratio", f"{ratio:.1f}x"),
    ], result)
    return result


# ----------------------------------------------------------------------------- 3. analysis


def _analysis_model(ctx: Context) -> pb.Model:
    """Benchmark 1's registered model, or a 3-epoch job's when benchmark 1 did not run."""
    s = ctx.sizes
    if not ctx.model:
        log("analysis: no model from the training benchmark in this run; training one (3 epochs)")
        ts = training_set(ctx, "train", s.train_tiles, s.tile_size)
        ctx.model = run_job(ctx, ts, 3).job.model
    return ctx.client.pipeline.GetModel(pb.GetModelRequest(name=ctx.model), timeout=30)


def _upload_held_out(ctx: Context) -> tuple[list[Path], list[str]]:
    """Writes and uploads the held-out tiles; their local paths and object keys."""
    s = ctx.sizes
    # Held-out tiles: source images after the training set's (generate_tiles yields a prefix).
    tiles = synthetic.generate_tiles(s.train_tiles + s.analysis_tiles, tile_size=s.tile_size, seed=SEED)
    held = tiles[-s.analysis_tiles:]
    folder = ctx.data / "analysis"
    synthetic.write_tile_set(held, folder / "tiles", folder / "truth")
    paths = [folder / "tiles" / f"{t.name}.png" for t in held]
    keys = ctx.client.upload(paths)
    return paths, [keys[p] for p in paths]


@dataclass(frozen=True)
class AnalysisFigures:
    """Benchmark 3's timed rounds (warm-up left out) and the ratios of its verdict."""

    rates: dict[str, list[float]]  # tiles/s per round: product, direct (node alone) and the bare variants
    bare: dict[str, Any]  # the bare worker's last answer (threads, node steps, node code without gRPC)
    ratio: float  # product / bare one-tile forward, median of per-round ratios
    ratio_b8: float  # the same against a batch-8 forward

    @classmethod
    def of(cls, rates: dict[str, list[float]], bare: dict[str, Any]) -> AnalysisFigures:
        # Per-round ratios (product and bare timed seconds apart), then their median.
        def per_round(key: str) -> float:
            return median([p / b for p, b in zip(rates["product"], rates[key], strict=True)])

        return cls(rates, bare, per_round("bare_b1"), per_round("bare_b8"))


def _time_product_and_node(ctx: Context, stub: trainer_pb2_grpc.TrainerServiceStub, request: pb.AnalyzeTilesRequest,
                           direct_request: trainer_pb2.AnalyzeTilesRequest, i: int) -> tuple[float, float]:
    """Round i's tiles/s through the product and through the trainer node alone."""
    n = len(request.image_keys)
    started = time.perf_counter()
    response = ctx.client.pipeline.AnalyzeTiles(request, timeout=600)
    product_rate = n / (time.perf_counter() - started)
    assert len(response.tiles) == n
    # Attribution only: the same request straight to the trainer node (what the
    # pipeline service forwards), without the pipeline's lookups and presigned URLs.
    direct_request.output_prefix = object_keys.analysis_prefix(f"bench-direct-{i}")
    started = time.perf_counter()
    stub.AnalyzeTiles(direct_request, timeout=600, metadata=auth_metadata(ctx.stack, "service"))
    direct_rate = n / (time.perf_counter() - started)
    return product_rate, direct_rate


def _measure_analysis(ctx: Context, model: pb.Model, request: pb.AnalyzeTilesRequest,
                      paths: list[Path]) -> AnalysisFigures:
    node = ctx.client.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest(), timeout=30).trainer_nodes[0]
    direct_request = trainer_pb2.AnalyzeTilesRequest(
        model=trainer_pb2.ModelRef(name=model.name, weights_uri=model.weights.uri, weights_sha256=model.weights.sha256,
                                   architecture=model.architecture, class_names=model.class_names),
        image_keys=request.image_keys)
    # The node runs analysis with SEGTRAIN_TRAINER_NUM_THREADS (ctx.threads): the bare side too.
    bare_spec = {**ctx.s3_spec(), "weights_uri": model.weights.uri, "weights_sha256": model.weights.sha256,
                 "tiles": [str(p) for p in paths],
                 "image_keys": request.image_keys[:], "threads": ctx.threads}
    infer_worker = Worker()  # its own process
    rates: dict[str, list[float]] = {"product": [], "direct": [], "bare_b1": [], "bare_b8": [], "predict_mask": []}
    repeats = ctx.sizes.repeats
    try:
        with grpc.insecure_channel(node.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            # Round 0 warms up (the node loads and caches the model); rounds interleave product,
            # node and bare so a burst of outside load hits all of them alike.
            for i in range(repeats + 1):
                product_rate, direct_rate = _time_product_and_node(ctx, stub, request, direct_request, i)
                bare = infer_worker.call("bare-infer", {**bare_spec, "stages": i == repeats})
                if i == 0:
                    continue
                rates["product"].append(product_rate)
                rates["direct"].append(direct_rate)
                for k, v in bare["tiles_per_s"].items():
                    rates[k].append(v)
    finally:
        infer_worker.close()
    return AnalysisFigures.of(rates, bare)


def bench_analysis(ctx: Context) -> dict[str, Any]:
    model = _analysis_model(ctx)
    paths, keys = _upload_held_out(ctx)
    request = pb.AnalyzeTilesRequest(model=model.name, image_keys=keys)
    log(f"analysis: AnalyzeTiles of {len(paths)} tiles x {ctx.sizes.repeats} (after a warm-up call)")
    figures = _measure_analysis(ctx, model, request, paths)
    result = _analysis_result(ctx, model, len(paths), figures)
    _print_analysis(ctx, model, len(paths), figures, result)
    return result


def _analysis_result(ctx: Context, model: pb.Model, n: int, figures: AnalysisFigures) -> dict[str, Any]:
    rates, bare = figures.rates, figures.bare
    return {
        "tiles": n, "tile_size": ctx.sizes.tile_size, "model": model.name, "architecture": model.architecture,
        "threads": bare["threads"],
        "product_tiles_per_s": round(median(rates["product"]), 1),
        "bare_b1_tiles_per_s": round(median(rates["bare_b1"]), 1),
        "bare_b8_tiles_per_s": round(median(rates["bare_b8"]), 1),
        "predict_mask_tiles_per_s": round(median(rates["predict_mask"]), 1),
        "node_direct_tiles_per_s": round(median(rates["direct"]), 1),
        "tiles_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "ratio": round(figures.ratio, 4), "ratio_vs_batch8": round(figures.ratio_b8, 4),
        "stage_ms_per_tile": {k: round(v, 3) for k, v in bare["stage_ms_per_tile"].items()},
        "node_code_tiles_per_s": {k: round(v, 1) for k, v in bare["node_path_tiles_per_s"].items()},
        "outside_load_cores": (load := ctx.outside_cores()),
        "verdicts": [verdict("analysis", figures.ratio, load)],
    }


def _print_analysis(ctx: Context, model: pb.Model, n: int, figures: AnalysisFigures, result: dict[str, Any]) -> None:
    rates, bare = figures.rates, figures.bare
    node_path = bare["node_path_tiles_per_s"]
    print_table("3. analysis: tiles/s through AnalyzeTiles vs a bare forward pass", [
        ("setup", f"{n} held-out tiles of {ctx.sizes.tile_size}^2, model {model.name} ({model.architecture}, "
                  "benchmark 1's job), "
                  f"{ctx.sizes.repeats} repeats after a warm-up"),
        ("threads", f"torch {bare['threads']} on both sides (the node's analysis uses SEGTRAIN_TRAINER_NUM_THREADS)"),
        ("product", "client.pipeline.AnalyzeTiles on pre-uploaded keys (RPC time only)"),
        ("product tiles/s", fmt_rates(rates["product"])),
        ("  node alone", fmt_rates(rates["direct"]) + "  (TrainerService.AnalyzeTiles called directly: attribution)"),
        ("bare forward tiles/s", fmt_rates(rates["bare_b1"]) + "  (one tile per forward, as the node)"),
        ("bare forward, batch 8", fmt_rates(rates["bare_b8"])),
        ("segcore predict_mask", fmt_rates(rates["predict_mask"]) + "  (normalise + forward + argmax, in memory)"),
        ("node steps ms/tile", ", ".join(f"{k} {v:.2f}" for k, v in bare["stage_ms_per_tile"].items())),
        ("node code, no gRPC", ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in node_path.items())
         + " tiles/s  (Analyzer in a worker process: attribution)"),
        ("ratio", f"{figures.ratio:.3f} (median of per-round ratios; vs batch-8 forward: {figures.ratio_b8:.3f})"),
    ], result)


# ----------------------------------------------------------------------------- 4. watch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def watch_latency(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ts = training_set(ctx, "watch", s.watch_tiles, s.watch_tile_size)
    job = create_job(ctx, ts, s.watch_epochs)
    received: list[tuple[float, common_pb2.JobEvent]] = []
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            with connect(ctx.stack, "viewer") as watcher:
                for event in watcher.watch(job.name):
                    received.append((time.time(), event))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=watch, name="latency-watcher", daemon=True)
    thread.start()
    time.sleep(1.0)  # let the stream open before anything is emitted
    log(f"watch: latency over a {s.watch_epochs}-epoch job of {s.watch_tiles} tiles at {s.watch_tile_size}^2")
    run_job(ctx, ts, s.watch_epochs, job)
    thread.join(60)
    if errors:
        raise RuntimeError(f"latency watcher failed: {errors[0]!r}")
    by_kind: dict[str, list[float]] = {}
    for when, event in received:
        if event.attempt < 1:
            continue  # the pipeline service's own state changes; event_time is not the trainer's
        ms = 1000 * (when - (event.event_time.seconds + event.event_time.nanos / 1e9))
        by_kind.setdefault(event.WhichOneof("payload") or "?", []).append(ms)
    every = [ms for values in by_kind.values() for ms in values]
    epochs = by_kind.get("epoch_metrics", [])
    return {"events": len(every), "epoch_metrics_events": len(epochs),
            "p50_ms": round(percentile(every, 50), 2), "p99_ms": round(percentile(every, 99), 2),
            "max_ms": round(max(every), 2) if every else None,
            "epoch_metrics_p50_ms": round(percentile(epochs, 50), 2),
            "epoch_metrics_p99_ms": round(percentile(epochs, 99), 2),
            "by_kind": {k: {"n": len(v), "p50_ms": round(percentile(v, 50), 2), "p99_ms": round(percentile(v, 99), 2)}
                        for k, v in sorted(by_kind.items())}}


def run_with_watchers(ctx: Context, ts: pb.TrainingSet, epochs: int, count: int
                      ) -> tuple[JobOutcome, dict[str, Any]]:
    job = create_job(ctx, ts, epochs)
    spec = {"address": ctx.stack.metrics_address, "job": job.name, "count": count, "connect_timeout_s": 20,
            "timeout_s": 240, "metadata": auth_metadata(ctx.stack, "viewer")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "worker.py"), "watchers"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_worker_env())
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line.startswith("CONNECTED"):
            raise RuntimeError(f"watchers did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        connected = int(line.split()[1])
        outcome = run_job(ctx, ts, epochs, job)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"watchers failed: {err[-2000:]}")
        summary = json.loads(out.strip().splitlines()[-1])
        summary["connected_before_start"] = connected
        return outcome, summary
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def watch_cost(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ts = training_set(ctx, "train", s.train_tiles, s.tile_size)
    order = ["A", "B", "B", "A"] * s.cost_rounds
    log(f"watch: training throughput without (A) / with (B) {s.watchers} watchers, jobs in the order "
        f"{' '.join(order)}, {s.cost_epochs} epochs each")
    plain: list[float] = []
    watched: list[float] = []
    arms: list[float] = []  # median images/s of each job, in run order
    plain_jobs: list[JobOutcome] = []
    watched_jobs: list[JobOutcome] = []
    summaries = []
    for arm in order:
        if arm == "A":
            outcome = run_job(ctx, ts, s.cost_epochs)
            job_rates = list(epoch_rates(outcome.events, ts.train_tile_count).values())
            plain += job_rates
            plain_jobs.append(outcome)
        else:
            outcome, summary = run_with_watchers(ctx, ts, s.cost_epochs, s.watchers)
            job_rates = list(epoch_rates(outcome.events, ts.train_tile_count).values())
            watched += job_rates
            watched_jobs.append(outcome)
            summaries.append(summary)
        arms.append(median(job_rates))
    # Adjacent pairs: in A B B A, (A, B) and (B, A); slowdown = median of the pairs' slowdowns.
    pairs = [(arms[i], arms[i + 1]) if order[i] == "A" else (arms[i + 1], arms[i]) for i in range(0, len(order), 2)]
    pair_slowdowns = [100 * (1 - b / a) for a, b in pairs]
    slowdown = median(pair_slowdowns)
    return {"watchers": s.watchers, "epochs_per_job": s.cost_epochs, "plain_images_per_s": round(median(plain), 2),
            "watched_images_per_s": round(median(watched), 2), "slowdown_pct": round(slowdown, 2),
            "pair_slowdowns_pct": [round(x, 2) for x in pair_slowdowns],
            "pooled_slowdown_pct": round(100 * (1 - median(watched) / median(plain)), 2),
            "plain_epoch_rates": [round(r, 2) for r in plain], "watched_epoch_rates": [round(r, 2) for r in watched],
            "plain_cpu_s": mean_cpu(plain_jobs), "watched_cpu_s": mean_cpu(watched_jobs),
            "plain_wall_s": round(statistics.mean(o.wall_s for o in plain_jobs), 2),
            "watched_wall_s": round(statistics.mean(o.wall_s for o in watched_jobs), 2),
            "watchers_process_cpu_s": round(statistics.mean(w["cpu_s"] for w in summaries), 2),
            "watcher_runs": summaries}


def _cpu_line(cpu: dict[str, float], wall: float) -> str:
    return f"wall {wall:.1f}; " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())


def bench_watch(ctx: Context) -> dict[str, Any]:
    latency = watch_latency(ctx)
    latency["outside_load_cores"] = ctx.outside_cores()
    ctx.outside = OutsideLoad()
    cost = watch_cost(ctx)
    cost["outside_load_cores"] = ctx.outside_cores()
    result = {"latency": latency, "cost": cost, "verdicts": [
        verdict("watch_latency", latency["p99_ms"], latency["outside_load_cores"]),
        verdict("watch_cost", cost["slowdown_pct"], cost["outside_load_cores"])]}
    s = ctx.sizes
    rows = [
        ("(a) setup", f"{ctx.architecture}, {s.watch_epochs} epochs of {s.watch_tiles} tiles at "
                      f"{s.watch_tile_size}^2; one SDK "
                      "Client.watch; latency = receive time - event_time (trainer node's clock = ours)"),
        ("(a) trainer events", f"n={latency['events']}  p50 {latency['p50_ms']:.1f} ms  p99 {latency['p99_ms']:.1f} ms"
                               f"  max {latency['max_ms']:.1f} ms"),
        ("(a) epoch_metrics only", f"n={latency['epoch_metrics_events']}  p50 {latency['epoch_metrics_p50_ms']:.1f} ms"
                                   f"  p99 {latency['epoch_metrics_p99_ms']:.1f} ms"),
    ]
    rows += [(f"(a)   {k}", f"n={v['n']}  p50 {v['p50_ms']:.1f} ms  p99 {v['p99_ms']:.1f} ms")
             for k, v in latency["by_kind"].items()]
    rows.append(("(a) outside load", _load_line(latency["outside_load_cores"])))
    rows += [
        ("(b) setup", f"benchmark 1's set, {s.cost_epochs} epochs per job, jobs in the order "
                      f"{' '.join(['A', 'B', 'B', 'A'] * s.cost_rounds)}; B has "
                      f"{s.watchers} WatchJobEvents streams (grpc.aio, one channel each, one extra process)"),
        ("(b) no watchers images/s", fmt_rates(cost["plain_epoch_rates"])),
        (f"(b) {s.watchers} watchers images/s", fmt_rates(cost["watched_epoch_rates"])),
        ("(b) slowdown per pair", " ".join(f"{x:+.1f}" for x in cost["pair_slowdowns_pct"])
         + " %  (adjacent A/B jobs)"),
        ("(b) slowdown", f"{cost['slowdown_pct']:+.2f} %  (median of the pairs; from the pooled medians "
                         f"{cost['pooled_slowdown_pct']:+.2f} %)"),
        ("(b) CPU s per job, none", _cpu_line(cost["plain_cpu_s"], cost["plain_wall_s"])),
        (f"(b) CPU s per job, {s.watchers}", _cpu_line(cost["watched_cpu_s"], cost["watched_wall_s"])
         + f", watchers process {cost['watchers_process_cpu_s']:.1f}"),
    ]
    runs = cost["watcher_runs"]
    errors: dict[str, int] = {}
    for w in runs:
        for code, n in w["errors"].items():
            errors[code] = errors.get(code, 0) + n
    rows.append(("(b) watcher streams", f"{len(runs)} runs: connected before start min "
                 f"{min(w['connected_before_start'] for w in runs)}/{s.watchers}, ended normally min "
                 f"{min(w['finished'] for w in runs)}, events per stream min {min(w['events_min'] for w in runs)} "
                 f"max {max(w['events_max'] for w in runs)}, errors {errors or 'none'}"))
    rows.append(("(b) outside load", _load_line(cost["outside_load_cores"])))
    print_table(f"4. watch: event latency to a subscriber, and the cost of {s.watchers} watchers on training",
                rows, result)
    return result


# ----------------------------------------------------------------------------- main


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "training": bench_training, "datapath": bench_datapath, "analysis": bench_analysis, "watch": bench_watch,
}


@dataclass(frozen=True)
class Options:
    """The command line, checked: the benchmarks to run and the sizes to run them at."""

    quick: bool
    threads: int
    out: Path
    architecture: str
    selected: list[str]  # in the order given
    overrides: dict[str, int]  # Sizes fields set on the command line
    sizes: Sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides of training "
                                                               "comparisons (default 1)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--architecture", default=ARCHITECTURE,
                        help=f"architecture of the jobs and worker-side models (default {ARCHITECTURE}); "
                             "see `segcore.architectures.list_architectures()`")
    sizing = parser.add_argument_group("sizes", "override the full (or --quick) sizes; for larger models on 2 cores")
    sizing.add_argument("--tiles", type=int, help=f"benchmark 1's training set, before the split; a multiple of 4 "
                                                  f"(default {FULL.train_tiles})")
    sizing.add_argument("--tile-size", type=int, help=f"tile edge in pixels, benchmarks 1-3 (default {FULL.tile_size})")
    sizing.add_argument("--batch-size", type=int, help=f"training batch size (default {FULL.batch_size})")
    sizing.add_argument("--epochs", type=int, help=f"epochs per training run, epoch 1 excluded; >= 2 "
                                                   f"(default {FULL.epochs})")
    sizing.add_argument("--rounds", type=int, help=f"benchmark 1's rounds of (bare, core, job) (default {FULL.rounds})")
    sizing.add_argument("--analysis-tiles", type=int, help=f"held-out tiles analysed (default {FULL.analysis_tiles})")
    sizing.add_argument("--repeats", type=int, help=f"timed repetitions of benchmarks 2 and 3 (default {FULL.repeats})")
    return parser


def parse_options(argv: list[str] | None) -> Options:
    """The parsed command line; exits with a usage error for an unknown benchmark or a bad size."""
    parser = _parser()
    args = parser.parse_args(argv)
    selected = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    overrides = {name: getattr(args, arg) for name, arg in (
        ("train_tiles", "tiles"), ("tile_size", "tile_size"), ("batch_size", "batch_size"), ("epochs", "epochs"),
        ("rounds", "rounds"), ("analysis_tiles", "analysis_tiles"), ("repeats", "repeats"))
        if getattr(args, arg) is not None}
    sizes = dataclasses.replace(QUICK if args.quick else FULL, **overrides)
    if sizes.train_tiles < 8 or sizes.train_tiles % 4:
        parser.error("--tiles must be a multiple of 4 (4 tiles per source image) and at least 8")
    if sizes.tile_size < 32 or sizes.tile_size % 32:
        parser.error("--tile-size must be a multiple of 32")
    if sizes.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    if min(sizes.batch_size, sizes.rounds, sizes.analysis_tiles, sizes.repeats) < 1:
        parser.error("--batch-size, --rounds, --analysis-tiles and --repeats must be at least 1")
    return Options(quick=args.quick, threads=args.threads, out=args.out, architecture=args.architecture,
                   selected=selected, overrides=overrides, sizes=sizes)


def _check_architecture(client: Client, architecture: str, summary: dict[str, Any]) -> None:
    # The stack's registry (the orchestrator stays torch-free): a typo fails here, not in a job.
    known = {a.name: a for a in client.list_architectures()}
    if architecture not in known:
        raise SystemExit(f"unknown architecture {architecture!r}; choose from {', '.join(sorted(known))}")
    summary["parameter_count"] = known[architecture].parameter_count
    log(f"architecture {architecture}: {known[architecture].parameter_count / 1e6:.2f} M parameters "
        "(2-class head)")


def _run_benchmarks(ctx: Context, selected: list[str], summary: dict[str, Any]) -> None:
    """The selected benchmarks in their fixed order; one that fails is reported and the rest still run."""
    for name in (b for b in BENCHMARKS if b in selected):
        t0 = time.monotonic()
        ctx.outside = OutsideLoad()
        try:
            summary["benchmarks"][name] = RUNNERS[name](ctx)
            summary["benchmarks"][name]["seconds"] = round(time.monotonic() - t0, 1)
        except Exception as exc:  # reported; the other benchmarks still run
            traceback.print_exc()
            summary["errors"][name] = repr(exc)[:2000]
            print(f"\n{name}: ERROR {exc!r}"[:3000], flush=True)


def _finish(summary: dict[str, Any], started: float, out: Path) -> None:
    """Counts the verdicts, prints the summary line and the JSON summary, and writes results.json."""
    summary["wall_s"] = round(time.monotonic() - started, 1)
    verdicts = [v for b in summary["benchmarks"].values() for v in b.get("verdicts", [])]
    summary["passed"] = sum(v["pass"] for v in verdicts)
    summary["missed"] = sum(not v["pass"] for v in verdicts)
    summary["disturbed"] = sum(v["disturbed"] for v in verdicts)
    print(f"\nSummary: {summary['passed']} PASS, {summary['missed']} MISS, {summary['disturbed']} of these "
          f"verdicts from a disturbed machine, {len(summary['errors'])} errors; "
          f"wall time {summary['wall_s']:.0f} s; logs in {out / 'stack' / 'logs'}")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, separators=(",", ":")), flush=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    started = time.monotonic()
    out: Path = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("stack", "data"):
        shutil.rmtree(out / stale, ignore_errors=True)
    print(f"segtrain benchmarks ({'quick' if opts.quick else 'full'}"
          f"{', sizes overridden: ' + str(opts.overrides) if opts.overrides else ''}): {', '.join(opts.selected)}; "
          f"architecture {opts.architecture}; {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}; torch threads {opts.threads}; CPU only")
    summary: dict[str, Any] = {"quick": opts.quick, "threads": opts.threads, "cpus": os.cpu_count(),
                               "architecture": opts.architecture, "sizes": dataclasses.asdict(opts.sizes),
                               "benchmarks": {}, "errors": {}}
    log("starting the local stack (S3, metrics, pipeline, 1 trainer node)")
    env = environment(given(TrainerSettings, num_threads=opts.threads))
    stack = LocalStack(out / "stack", trainers=1, env_overrides=env)
    with stack, connect(stack, "admin") as client:
        ctx = Context(sizes=opts.sizes, threads=opts.threads, architecture=opts.architecture, quick=opts.quick,
                      stack=stack, client=client, data=out / "data")
        try:
            _check_architecture(client, opts.architecture, summary)
            _run_benchmarks(ctx, opts.selected, summary)
        finally:
            ctx.trainer_worker.close()
    _finish(summary, started, out)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
