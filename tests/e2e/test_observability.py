"""Prometheus metrics of the running stack: while a job trains, every series the README's
Observability table lists is served by the process it names, with values that follow what
happens (the RPCs just made, the job running, its node, its watcher)."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from segtrain.common.v1 import common_pb2

from clients.sdk import Client
from clients.stack import LocalStack
from tests.e2e.conftest import wait_for_state
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"
PROCESS = {"every service": ("pipeline", "metrics", "trainer-1"), "pipeline": ("pipeline",),
           "metrics": ("metrics",), "trainer": ("trainer-1",)}


def documented() -> list[tuple[str, str]]:
    """(series, served by) of each row of the README's table."""
    table = README.read_text().split("| Series | Type | Labels | Served by | Meaning |", 1)[1].split("\n\n", 1)[0]
    return [(row[0].strip("`"), row[3]) for row in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:])]


def scrape(stack: LocalStack, process: str) -> dict[str, list[Sample]]:
    """Samples by family name as exposed (a counter's with its `_total`)."""
    url = f"http://127.0.0.1:{stack.prometheus_ports[process]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name + ("_total" if family.type == "counter" else ""): family.samples
            for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_documented_series_is_served_and_follows_a_running_job(
        stack: LocalStack, client: Client, tmp_path: Path) -> None:
    rows = documented()
    assert len(rows) >= 15 and all(re.fullmatch(r"[a-z_]+", name) for name, _ in rows), rows
    images, masks = write_sample_set(tmp_path / "set", count=32, tile_size=96, seed=3)
    training_set = client.create_training_set("observed", images, masks, class_names=["bg", "fg", "x"])
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=30, batch_size=2))
    client.start_job(job.name)
    watcher = threading.Thread(target=lambda: list(client.watch(job.name)), daemon=True)
    watcher.start()
    try:
        wait_for_state(client, job.name, {common_pb2.JOB_STATE_RUNNING}, 120)
        deadline = time.monotonic() + 120
        while True:  # until the node has measured the job's rate (two progress events)
            trainer = scrape(stack, "trainer-1")
            rate = value(trainer["segtrain_training_images_per_second"], "segtrain_training_images_per_second",
                         job=job.name)
            if rate > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        scraped = {process: scrape(stack, process) for process in ("pipeline", "metrics", "trainer-1")}
        scraped["trainer-1"] = trainer
    finally:
        if client.get_job(job.name).state not in {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}:
            client.cancel_job(job.name)
    for name, served_by in rows:
        for process in PROCESS[served_by]:
            assert name in scraped[process], f"{name} missing from {process}'s /metrics"
    assert rate > 0, "no training rate for the running job"
    pipeline, metrics = scraped["pipeline"], scraped["metrics"]
    assert value(pipeline["grpc_server_handled_total"], "grpc_server_handled_total", grpc_method="StartJob",
                 grpc_code="OK", grpc_service="segtrain.pipeline.v1.PipelineService") >= 1
    assert value(pipeline["grpc_server_handling_seconds"], "grpc_server_handling_seconds_count",
                 grpc_method="CreateJob") >= 1
    assert value(pipeline["segtrain_jobs"], "segtrain_jobs", kind="training", state="RUNNING") >= 1
    assert value(pipeline["segtrain_trainer_nodes"], "segtrain_trainer_nodes", state="READY") >= 1
    assert value(pipeline["segtrain_trainer_node_jobs"], "segtrain_trainer_node_jobs", node="local-1") >= 1
    assert value(metrics["segtrain_watchers"], "segtrain_watchers") >= 1
    assert value(metrics["segtrain_event_lag_seconds"], "segtrain_event_lag_seconds_count") >= 1
    assert value(metrics["grpc_server_handled_total"], "grpc_server_handled_total",
                 grpc_method="AppendJobEvents", grpc_code="OK") >= 1
    assert value(scraped["trainer-1"]["grpc_server_handled_total"], "grpc_server_handled_total",
                 grpc_method="RunJob", grpc_code="OK") >= 1
    wait_for_state(client, job.name, {common_pb2.JOB_STATE_CANCELLED, common_pb2.JOB_STATE_SUCCEEDED}, 120)
