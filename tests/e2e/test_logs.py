"""Structured logs on the running stack (its e2e stack logs JSON): one attempt's records are found
across the pipeline service, the trainer node and the attempt's worker by its job and attempt."""

from __future__ import annotations

import json

import pytest
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.stack import LocalStack

pytestmark = pytest.mark.e2e


def test_an_attempts_records_carry_its_job_and_attempt_in_every_service(
        stack: LocalStack, trained_model: pb.Model) -> None:
    by_file: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for path in sorted(stack.logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("job") == trained_model.job:
                    by_file.setdefault(path.stem, []).append(record)
    pipeline = [r for name, records in by_file.items() if name.startswith("pipeline") for r in records]
    trainer = [r for name, records in by_file.items() if name.startswith("trainer") for r in records]
    assert any("has ended" in r["message"] and r["attempt"] == 1 for r in pipeline), by_file.keys()
    assert any("rank 0 of 1" in r["message"] and r["attempt"] == 1 for r in trainer), by_file.keys()
    assert {"time", "level", "logger", "message", "process", "thread"} <= set(pipeline[0])
