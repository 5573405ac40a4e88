"""The `segtrain` CLI against the running stack: every verb, with --json for scripts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clients.cli.main import main as segtrain
from clients.stack import LocalStack
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    assert segtrain([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_every_verb_through_the_cli(stack: LocalStack, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    pipelines = run_json(capsys, "pipelines", "list")[0]["pipelines"]
    assert "pipelines/segmentation" in {p["name"] for p in pipelines}
    listed = run_json(capsys, "architectures", "list")[0]["architectures"]
    archs = {a["name"]: int(a["parameter_count"]) for a in listed}
    assert archs["upernet-convnext-cpu"] < 1_000_000 < archs["upernet-convnext-base"]

    tiles, masks = write_sample_set(tmp_path / "set", count=12, tile_size=64, seed=21)
    created = run_json(capsys, "sets", "create", "cli-cells", "--tiles", str(tiles), "--masks", str(masks),
                       "--classes", "background,nucleus,debris", "--group-by", "^(.*)_tile")[0]
    assert created["name"] == "trainingSets/cli-cells" and created["tile_count"] == 12
    assert created["state"] == "STATE_READY"
    assert run_json(capsys, "sets", "get", "cli-cells")[0]["snapshot"] == created["snapshot"]

    job = run_json(capsys, "jobs", "create", "--pipeline", "segmentation", "--training-set", "cli-cells",
                   "--architecture", "upernet-convnext-cpu", "--epochs", "2", "--batch-size", "4",
                   "--learning-rate", "0.002")[0]
    assert job["hyperparameters"]["learning_rate"] == 0.002 and job["state"] == "JOB_STATE_PENDING"
    assert run_json(capsys, "jobs", "start", job["name"])[0]["state"] == "JOB_STATE_QUEUED"

    events = run_json(capsys, "jobs", "watch", job["name"])
    seqs = [int(e["seq"]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["epoch_metrics"]["epoch"] for e in events if "epoch_metrics" in e] == [1, 2]
    tail = run_json(capsys, "jobs", "watch", job["name"], "--after-seq", str(seqs[-3]))
    assert [int(e["seq"]) for e in tail] == seqs[-2:]

    done = run_json(capsys, "jobs", "get", job["name"])[0]
    assert done["state"] == "JOB_STATE_SUCCEEDED" and done["model"]
    assert job["name"] in {j["name"] for j in run_json(capsys, "jobs", "list")[0]["jobs"]}
    assert "trainingSets/cli-cells" in {t["name"] for t in run_json(capsys, "sets", "list")[0]["training_sets"]}
    models = run_json(capsys, "models", "list")[0]["models"]
    assert done["model"] in {m["name"] for m in models}

    charts = run_json(capsys, "jobs", "chart", job["name"], "--out", str(tmp_path / "charts"))[0]
    assert Path(charts["loss"]).stat().st_size > 1000 and Path(charts["iou"]).stat().st_size > 1000

    new, _ = write_sample_set(tmp_path / "new", count=2, tile_size=64, seed=22)
    analysis = run_json(capsys, "analyze", "--model", done["model"], "--tiles", str(new), "--out",
                        str(tmp_path / "out"))[0]
    assert len(analysis["tiles"]) == 2 and analysis["analysis"]["state"] == "JOB_STATE_SUCCEEDED"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in new.iterdir()] + ["classes.csv", "classes.json", "manifest.json", "tiles.csv", "tiles.json"])
    name = analysis["analysis"]["name"]
    assert name in {a["name"] for a in run_json(capsys, "analyses", "list")[0]["analysis_jobs"]}
    assert run_json(capsys, "analyses", "get", name)[0]["analysis"]["results"]["tiles_analysed"] == "2"
    watched = run_json(capsys, "analyses", "watch", name)
    assert watched[-1]["state_change"]["state"] == "JOB_STATE_SUCCEEDED"
    queued = run_json(capsys, "analyses", "create", "--model", done["model"], "--training-set", "cli-cells",
                      "--no-wait")[0]
    assert queued["name"].startswith("analyses/") and queued["state"] == "JOB_STATE_QUEUED"
    cancelled = run_json(capsys, "analyses", "cancel", queued["name"])[0]
    assert cancelled["state"] in {"JOB_STATE_CANCELLED", "JOB_STATE_CANCELLING"}


def test_bad_input_exits_non_zero_with_the_status(stack: LocalStack, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    assert segtrain(["jobs", "create", "--pipeline", "segmentation", "--training-set", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert segtrain(["jobs", "get", "jobs/j-doesnotexist"]) == 2


def test_a_set_that_fails_exits_1_naming_its_tile(stack: LocalStack, capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    tiles, masks = write_sample_set(tmp_path / "set", count=6, tile_size=64, seed=23)
    (tiles / sorted(p.name for p in tiles.iterdir())[2]).write_bytes(b"not an image")
    capsys.readouterr()
    assert segtrain(["sets", "create", "cli-broken", "--tiles", str(tiles), "--masks", str(masks),
                     "--classes", "background,nucleus,debris"]) == 1
    out = capsys.readouterr()
    assert "FAILED" in out.out and "UNREADABLE" in out.out and "(tiles[2])" in out.out
    assert segtrain(["sets", "get", "cli-broken"]) == 1


def test_human_watch_prints_epoch_lines_like_the_seed(stack: LocalStack, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.sdk import Client

    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    client = Client(stack.pipeline_address, token=stack.tokens["trainer"])
    tiles, masks = write_sample_set(tmp_path / "set", count=8, tile_size=64, seed=23)
    client.create_training_set("cli-watch", tiles, masks, class_names=["background", "nucleus", "debris"])
    capsys.readouterr()
    assert segtrain(["jobs", "create", "--pipeline", "segmentation", "--training-set", "cli-watch",
                     "--architecture", "upernet-convnext-cpu", "--epochs", "2", "--batch-size", "4"]) == 0
    name = capsys.readouterr().out.strip()
    assert segtrain(["jobs", "start", name]) == 0
    assert segtrain(["jobs", "watch", name]) == 0
    out = capsys.readouterr().out
    line = r"Epoch 2/2: Train Loss \d\.\d{4}, Train IoU \d\.\d{4}, Val Loss \d\.\d{4}, Val IoU \d\.\d{4}"
    assert re.search(line, out)
    assert "state: SUCCEEDED" in out
