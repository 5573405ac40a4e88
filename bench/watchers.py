"""`make bench-watchers`: how far one metrics process fans a job's events out to live watchers.

One metrics service (a real `python -m services.metrics_svc` process, SQLite, loopback) and, for
each size in --sizes, that many watchers spread over --clients client processes (grpc.aio, several
channels each), each following one of --jobs jobs from seq 0. A producer in this process appends
to every job at --rate events per second per job (what a trainer's batch progress sends), each
event stamped with its send time, for --seconds, then ends every job with its terminal state
change. Every watcher checks it got its job's whole log, gap-free, in order.

Reported per size: watchers complete, trainer -> watcher latency (p50/p99, from the event's send
stamp to its arrival, one host clock), AppendJobEvents p99 against its idle p99 (the same
producer with no watchers, measured first), and the metrics process's CPU (cores) and peak RSS.
Targets (issue 11): at 2,000 watchers every log whole, latency p99 <= 250 ms, append p99 <= 2x
idle. All processes share this machine's cores, the clients included.

With --open-per-second N the clients open the streams at N a second instead of all at once.

    .venv/bin/python bench/watchers.py [--sizes 2000,5000,10000] [--clients 4] [--jobs 10]
        [--open-per-second 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gen"))

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

from clients import names
from clients.stack import free_port

LATENCY_TARGET_MS = 250.0
APPEND_RATIO_TARGET = 2.0
STREAMS_PER_CHANNEL = 200


@dataclass
class SizeResult:
    watchers: int
    complete: int
    latency_p50_ms: float
    latency_p99_ms: float
    append_p99_ms: float
    append_idle_p99_ms: float
    server_cores: float
    server_peak_rss_mb: float

    @property
    def append_ratio(self) -> float:
        return self.append_p99_ms / self.append_idle_p99_ms if self.append_idle_p99_ms else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# ------------------------------------------------------------------ client processes


class WatchEnded(Exception):
    """A watch that ended with an error before its job's end: its code, when, and whether events came."""


async def _watch(stub: metrics_pb2_grpc.MetricsServiceStub, job: str) -> tuple[bool, list[float]]:
    """Follows `job` to its end: (gap-free and whole, latencies in ms)."""
    seqs, latencies = [], []
    call = stub.WatchJobEvents(metrics_pb2.WatchJobEventsRequest(job=job, include_batch_progress=True))
    started = time.monotonic()
    try:
        async for item in call:
            if item.HasField("event"):
                seqs.append(item.event.seq)
                if item.event.HasField("batch_progress"):  # the producer's live events
                    sent = item.event.event_time.seconds + item.event.event_time.nanos / 1e9
                    latencies.append((time.time() - sent) * 1000)
    except grpc.aio.AioRpcError as exc:  # how it ended, in a form that counts (not one repr per stream)
        after = "under 1 s" if time.monotonic() - started < 1 else "after 1 s or more"
        raise WatchEnded(f"{exc.code().name} {after}, {'with' if seqs else 'before any'} events") from None
    return seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 0, latencies


async def _client(address: str, watchers: int, jobs: list[str], first: int, open_per_second: float
                  ) -> dict[str, object]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, watchers // STREAMS_PER_CHANNEL))]
    stubs = [metrics_pb2_grpc.MetricsServiceStub(c) for c in channels]
    tasks = []
    for i in range(watchers):  # all at once, or open_per_second of them each second
        tasks.append(asyncio.create_task(_watch(stubs[i % len(stubs)], jobs[(first + i) % len(jobs)])))
        if open_per_second and i % 10 == 9:
            await asyncio.sleep(10 / open_per_second)
    print("READY", flush=True)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    ok = [r for r in results if isinstance(r, tuple) and r[0]]
    errors = Counter(str(r) if isinstance(r, WatchEnded) else repr(r)[:200]
                     for r in results if not isinstance(r, tuple))
    latencies = [lat for r in ok for lat in r[1]]
    # A sample keeps the pipe small; percentiles over 20k samples per client are stable enough.
    step = max(1, len(latencies) // 20000)
    return {"complete": len(ok), "latencies": latencies[::step], "errors": errors}


def client_main() -> None:
    spec = json.loads(sys.stdin.readline())
    result = asyncio.run(_client(spec["address"], spec["watchers"], spec["jobs"], spec["first"],
                                 spec["open_per_second"]))
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------ the producer and the run


def event(attempt: int, source_seq: int, *, final: bool = False) -> common_pb2.JobEvent:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    if final:
        return common_pb2.JobEvent(attempt=0, source_seq=source_seq, event_time=stamp,
                                   state_change=common_pb2.StateChange(state=common_pb2.JOB_STATE_SUCCEEDED))
    return common_pb2.JobEvent(attempt=attempt, source_seq=source_seq, event_time=stamp,
                               batch_progress=common_pb2.BatchProgress(epoch=1, batch=source_seq, loss=0.5))


def produce(stub: metrics_pb2_grpc.MetricsServiceStub, jobs: list[str], rate: float, seconds: float,
            *, finish: bool) -> list[float]:
    """Appends to every job at `rate` events/s each for `seconds`; AppendJobEvents latencies (ms)."""
    latencies, seq = [], 0
    period = 1.0 / rate
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        seq += 1
        tick = time.monotonic()
        for job in jobs:
            sent = time.perf_counter()
            stub.AppendJobEvents(metrics_pb2.AppendJobEventsRequest(job=job, events=[event(1, seq)]), timeout=30)
            latencies.append((time.perf_counter() - sent) * 1000)
        time.sleep(max(0.0, period - (time.monotonic() - tick)))
    if finish:
        for job in jobs:
            # The pipeline's own series (attempt 0): after the job's first event, its terminal state.
            stub.AppendJobEvents(metrics_pb2.AppendJobEventsRequest(job=job, events=[event(0, 2, final=True)]),
                                 timeout=30)
    return latencies


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_metrics(root: Path, max_streams: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "SEGTRAIN_METRICS_LISTEN": f"127.0.0.1:{port}",
           "SEGTRAIN_METRICS_DATABASE_URL": f"sqlite:///{root / 'metrics.db'}",
           "SEGTRAIN_MAX_STREAMS_PER_PRINCIPAL": str(max_streams),
           "SEGTRAIN_METRICS_WATCHER_BUFFER": "5000", "SEGTRAIN_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "services.metrics_svc"], env=env, cwd=Path(__file__).parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("READY"):
        raise RuntimeError(f"metrics service did not start: {line!r}")
    return process, f"127.0.0.1:{port}"


def run_size(address: str, pid: int, size: int, args: argparse.Namespace, round_: int,
             idle_p99: float) -> SizeResult:
    jobs = [names.job(f"j-w{round_}-{j}") for j in range(args.jobs)]
    stub = metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(address))
    for job in jobs:  # a job exists once it has an event
        stub.AppendJobEvents(metrics_pb2.AppendJobEventsRequest(job=job, events=[common_pb2.JobEvent(
            attempt=0, source_seq=1, warning=common_pb2.Warning(code="BENCH"))]), timeout=30)
    share = [size // args.clients + (1 if i < size % args.clients else 0) for i in range(args.clients)]
    clients = []
    for i, count in enumerate(share):
        proc = subprocess.Popen([sys.executable, __file__, "--client"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdin is not None and proc.stdout is not None
        spec = {"address": address, "watchers": count, "jobs": jobs, "first": sum(share[:i]),
                "open_per_second": args.open_per_second / args.clients}
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        clients.append(proc)
    for proc in clients:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("a watcher client did not start")
    opening = size / args.open_per_second if args.open_per_second else 0.0
    time.sleep(opening + min(10.0, 1.0 + size / 1000))  # the streams open and replay
    cpu_before, wall_before = process_cpu_s(pid), time.monotonic()
    appends = produce(stub, jobs, args.rate, args.seconds, finish=True)
    outcomes = []
    for proc in clients:
        assert proc.stdout is not None
        outcomes.append(json.loads(proc.stdout.readline()))
        proc.wait(60)
    cores = (process_cpu_s(pid) - cpu_before) / (time.monotonic() - wall_before)
    latencies = [lat for o in outcomes for lat in o["latencies"]]
    ended: Counter[str] = Counter()
    for o in outcomes:
        ended.update(o["errors"])
    for how, count in ended.most_common():
        print(f"  {count} watchers ended {how}", flush=True)
    return SizeResult(size, sum(o["complete"] for o in outcomes), percentile(latencies, 50), percentile(latencies, 99),
                      percentile(appends, 99), idle_p99, cores, peak_rss_mb(pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,5000,10000")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2.0, help="events per second per job")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--open-per-second", type=float, default=0.0,
                        help="watch streams opened per second, all clients together (0: every one at once)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main()
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as root:
        server, address = start_metrics(Path(root), max(sizes) + 100)
        try:
            stub = metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(address))
            idle_jobs = [names.job(f"j-idle-{j}") for j in range(args.jobs)]
            idle_p99 = percentile(produce(stub, idle_jobs, args.rate, min(args.seconds, 10.0), finish=False), 99)
            print(f"bench-watchers: {os.cpu_count()} CPUs, {args.jobs} jobs x {args.rate:g} events/s for "
                  f"{args.seconds:g} s, {args.clients} client processes; idle AppendJobEvents p99 {idle_p99:.1f} ms",
                  flush=True)
            results = []
            for round_, size in enumerate(sizes):
                results.append(run_size(address, server.pid, size, args, round_, idle_p99))
                print(f"{size} watchers: {asdict(results[-1])}", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print(f"\n{'watchers':>9} {'complete':>9} {'p50 ms':>7} {'p99 ms':>7} {'append p99/idle':>16} "
          f"{'server cores':>13} {'server RSS MB':>14}")
    for r in results:
        print(f"{r.watchers:>9} {r.complete:>9} {r.latency_p50_ms:>7.1f} {r.latency_p99_ms:>7.1f} "
              f"{r.append_p99_ms:>7.1f}/{r.append_idle_p99_ms:<4.1f}={r.append_ratio:>4.1f} {r.server_cores:>13.2f} "
              f"{r.server_peak_rss_mb:>14.0f}")
    verdicts = {}
    for r in results:
        if r.watchers == 2000:
            verdicts = {"complete": r.complete == r.watchers, "latency": r.latency_p99_ms <= LATENCY_TARGET_MS,
                        "append": r.append_ratio <= APPEND_RATIO_TARGET}
            word = {True: "PASS", False: "MISS"}
            print(f"2,000 watchers: logs whole {word[verdicts['complete']]}; latency p99 {r.latency_p99_ms:.0f} ms "
                  f"(<= {LATENCY_TARGET_MS:.0f}) {word[verdicts['latency']]}; append p99 {r.append_ratio:.1f}x idle "
                  f"(<= {APPEND_RATIO_TARGET:.0f}x) {word[verdicts['append']]}")
    print(json.dumps({"sizes": [asdict(r) for r in results], "verdicts": verdicts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
