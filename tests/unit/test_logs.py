"""Structured logs: JSON lines with the job and attempt of the thread that logged, text unchanged."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import pytest

from services.common import logs


@pytest.fixture()
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_records_carry_the_job_and_attempt_of_the_thread_that_logged(
        root_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    log = logging.getLogger("segtrain.test")
    log.info("before %d", 1)
    worker = threading.Thread(target=logs.in_job("jobs/j-1", 2, lambda: log.warning("inside")))
    worker.start()
    worker.join()
    with logs.about_job("analyses/a-9"):
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.debug("below the level")
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [r["message"] for r in records] == ["before 1", "inside", "failed"]
    assert "job" not in records[0] and "attempt" not in records[0]
    assert (records[1]["job"], records[1]["attempt"], records[1]["level"]) == ("jobs/j-1", 2, "WARNING")
    assert records[2]["job"] == "analyses/a-9" and "attempt" not in records[2]
    assert "ValueError: boom" in records[2]["exception"] and records[2]["logger"] == "segtrain.test"
    assert records[0]["time"].endswith("+00:00")


def test_text_lines_stay_as_they_were(root_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "text")
    with logs.about_job("jobs/j-1", 1):
        logging.getLogger("segtrain.test").info("plain")
    assert capsys.readouterr().err.strip().endswith("INFO segtrain.test: plain")
