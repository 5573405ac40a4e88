"""Model export against the real stack: a trained model exported through the CLI and the SDK, the
README's example run on the exports in a clean interpreter that imports no segtrain module, its
masks checked against segtrain's own analysis; stored exports returned again, refused requests,
and a deleted model's exports deleted with it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.cli.main import main as segtrain
from clients.sdk import Client
from clients.stack import LocalStack
from services.common import object_keys
from services.common.storage import ObjectStore
from tests.e2e.conftest import CLASSES, train
from tests.helpers import error_of, write_sample_set

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"
OURS = ("segcore", "services", "clients", "segtrain", "tests")


def readme_example() -> str:
    """The python block of the README's "Model export" section."""
    section = README.read_text().split("## Model export\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Model export section shows one python example"
    return blocks[0]


def run_clean(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`script` in an isolated interpreter (no working directory or PYTHON* variables on its path,
    the hub offline), which fails if it imported any module of this repository."""
    guard = (f"\nimport sys\nours = sorted(m for m in sys.modules if m.split('.')[0] in {OURS!r})\n"
             "assert not ours, f'the example imported {ours}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SEGTRAIN_"))}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-I", "-c", script + guard], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_readme_example_predicts_from_hf_and_onnx_exports_what_segtrain_predicts(
        stack: LocalStack, client: Client, trained_model: pb.Model, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    user = tmp_path / "user"
    user.mkdir()
    for fmt in ("hf", "onnx"):
        capsys.readouterr()
        out = user / f"model-{fmt}"
        assert segtrain(["models", "export", trained_model.name, "--format", fmt, "--out", str(out)]) == 0
        assert f"{trained_model.name} as {fmt}" in capsys.readouterr().out
    assert sorted(p.name for p in (user / "model-hf").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in (user / "model-onnx").iterdir()] == ["model.onnx"]
    config = json.loads((user / "model-hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    preprocessing = json.loads((user / "model-hf" / "preprocessor_config.json").read_text())["segtrain"]
    assert preprocessing["tile_size"] == trained_model.tile_size and preprocessing["class_names"] == CLASSES

    tiles, _ = write_sample_set(tmp_path / "new", count=1, tile_size=64, seed=77)
    tile = sorted(tiles.iterdir())[0]
    Image.open(tile).save(user / "tile.png")
    ran = run_clean(readme_example(), user)
    assert ran.returncode == 0, ran.stderr[-3000:]
    exported_mask = np.load(user / "mask.npy")

    analysed = client.analyze(trained_model.name, [tile], tmp_path / "analysed")
    assert analysed.job.state == common_pb2.JOB_STATE_SUCCEEDED
    segtrain_mask = np.asarray(Image.open(tmp_path / "analysed" / f"{tile.stem}.png"))
    assert exported_mask.shape == segtrain_mask.shape == (64, 64)
    agreement = float((exported_mask == segtrain_mask).mean())
    assert agreement >= 0.999, f"the exported model and segtrain disagree on {1 - agreement:.2%} of the pixels"


def test_exports_are_checked_stored_once_and_bad_requests_refused(
        client: Client, trained_model: pb.Model, stack_store: ObjectStore, tmp_path: Path) -> None:
    first = client.export_model(trained_model.name, "torchscript", tmp_path / "ts")
    assert [f.name for f in first.files] == ["model.pt"] and (tmp_path / "ts" / "model.pt").is_file()
    assert 0 <= first.max_abs_difference <= 1e-3 and len(first.checked_shapes) == 2
    assert first.format == common_pb2.EXPORT_FORMAT_TORCHSCRIPT and first.model == trained_model.name
    again = client.export_model(trained_model.name, "torchscript")
    assert again.create_time == first.create_time, "a stored export is returned, not made again"
    assert [f.sha256 for f in again.files] == [f.sha256 for f in first.files]
    assert again.files[0].url and again.expire_time.seconds > first.create_time.seconds

    loaded = run_clean("import torch\nm = torch.jit.load('model.pt')\n"
                       "print(tuple(m(torch.zeros(2, 3, 96, 64)).shape))\n", tmp_path / "ts")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == f"(2, {len(CLASSES)}, 96, 64)"

    unspecified = error_of(client.pipeline.ExportModel, pb.ExportModelRequest(name=trained_model.name), timeout=30)
    assert unspecified.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in unspecified.details()
    missing = error_of(client.pipeline.ExportModel, pb.ExportModelRequest(
        name="models/m-000000000000", format=common_pb2.EXPORT_FORMAT_HF), timeout=30)
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_exports_make_one_and_a_deleted_models_exports_go_with_it(
        client: Client, stack_store: ObjectStore, tmp_path: Path) -> None:
    done = train(client, tmp_path, "e2e-export-delete", tiles=4, seed=9)
    with ThreadPoolExecutor(max_workers=3) as pool:  # concurrent calls: one makes it, the others wait for it
        made = list(pool.map(lambda _: client.export_model(done.model, "hf"), range(3)))
    assert len({m.create_time.ToNanoseconds() for m in made}) == 1, "the export was made more than once"
    export = made[0]
    prefix = object_keys.model_exports_prefix(done.name.split("/")[-1])
    assert {f.uri for f in export.files} <= set(stack_store.list_keys(prefix))
    client.delete_model(done.model)
    assert stack_store.list_keys(prefix) == []
