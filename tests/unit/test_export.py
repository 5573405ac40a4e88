"""segcore.export without a server: the formats' files, ONNX parity with torch on sizes the export
never saw, the pooling that makes dynamic sizes exact, and exports that do not compute what the
model does refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
import torch

from segcore import export, inference
from segcore.architectures import build_model
from segcore.checkpoint import ModelMeta
from segcore.intensity import IMAGENET_NORMALIZATION, PERCENTILE, Normalization

CLASSES = ["background", "cell", "edge"]


def meta(normalization: Normalization = IMAGENET_NORMALIZATION, tile_size: int = 128) -> ModelMeta:
    return ModelMeta(architecture="upernet-convnext-cpu", class_names=CLASSES,
                     normalization=normalization.to_dict(), tile_size=tile_size)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("upernet-convnext-cpu", len(CLASSES)).eval()


def test_the_export_pooling_equals_adaptive_pooling_on_every_size() -> None:
    generator = torch.Generator().manual_seed(1)
    for height, width in [(1, 1), (2, 3), (4, 4), (5, 7), (13, 6), (17, 31)]:
        x = torch.randn(2, 4, height, width, generator=generator)
        for bins in (1, 2, 3, 6):
            ours = export._AdaptiveAvgPool2d(bins)(x)
            torch.testing.assert_close(ours, torch.nn.functional.adaptive_avg_pool2d(x, bins), rtol=0, atol=1e-6)


def test_onnx_matches_torch_on_batches_and_sizes_the_export_never_saw(model: torch.nn.Module, tmp_path: Path) -> None:
    done = export.export(model, meta(), tmp_path, "onnx")
    assert done.files == ["model.onnx"] and done.max_abs_difference is not None
    assert done.max_abs_difference <= export.PARITY_TOLERANCE and len(done.checked_shapes) == 2
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    generator = torch.Generator().manual_seed(2)
    for shape in [(3, 3, 32, 32), (1, 3, 200, 72), (4, 3, 96, 160)]:
        pixels = torch.randn(*shape, generator=generator)
        (logits,) = session.run(["logits"], {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            expected = model(pixel_values=pixels).logits.numpy()
        assert logits.shape == (shape[0], len(CLASSES), *shape[2:])
        assert float(np.abs(logits - expected).max()) <= 1e-3, shape


def test_hf_writes_labels_and_the_preprocessing_for_each_normalization(model: torch.nn.Module, tmp_path: Path) -> None:
    done = export.export(model, meta(), tmp_path / "imagenet", "hf")
    assert done.files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((tmp_path / "imagenet" / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "cell", "2": "edge"} and config["label2id"]["edge"] == 2
    processor = json.loads((tmp_path / "imagenet" / "preprocessor_config.json").read_text())
    assert processor["do_rescale"] and processor["rescale_factor"] == pytest.approx(1 / 255)
    assert processor["image_mean"] == list(IMAGENET_NORMALIZATION.mean) and not processor["do_resize"]
    assert processor["segtrain"]["tile_size"] == 128 and processor["segtrain"]["class_names"] == CLASSES

    percentile = Normalization(mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3), mode=PERCENTILE, percentile_high=99.5)
    export.export(model, meta(percentile), tmp_path / "percentile", "hf")
    processor = json.loads((tmp_path / "percentile" / "preprocessor_config.json").read_text())
    assert not processor["do_rescale"], "the per-image percentile scaling is not a fixed rescale"
    spec = processor["segtrain"]
    assert spec["normalization"]["percentile_high"] == 99.5 and "99.5th" in spec["steps"][0]


class _ShapeDependent(torch.nn.Module):
    """Computes something else for narrow images: a trace records one branch only."""

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        logits = pixel_values[:, :1] * (2.0 if pixel_values.shape[-1] > 110 else 3.0)
        return SimpleNamespace(logits=logits)


def test_an_export_that_does_not_compute_what_the_model_does_is_refused(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="computes different logits"):
        export.export(_ShapeDependent(), meta(), tmp_path, "torchscript")


def test_an_unknown_format_is_refused(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="valid: hf, onnx, torchscript"):
        export.export(model, meta(), tmp_path, "tflite")


def readme_preprocessing() -> str:
    """The lines of the README's export example that turn `image` into `pixels`."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Model export\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("if norm["))
    end = next(i for i, line in enumerate(lines) if line.startswith("pixels = "))
    return "\n".join(lines[start:end + 1])


@pytest.mark.parametrize("mode", ["dataset", "imagenet", PERCENTILE])
@pytest.mark.parametrize("kind", ["rgb8", "rgb16", "grey16"])
def test_the_readmes_preprocessing_gives_the_input_segtrain_gives_the_network(mode: str, kind: str) -> None:
    """What the README tells a user without segtrain to do is what the model saw in training."""
    rng = np.random.default_rng(3)
    if kind == "rgb8":
        image = rng.integers(0, 256, size=(40, 56, 3)).astype(np.uint8)
    else:
        values = rng.gamma(2.0, 300.0, size=(40, 56, 3 if kind == "rgb16" else 1)).astype(np.uint16)
        image = np.repeat(values, 3, axis=2) if kind == "grey16" else values
    norm = IMAGENET_NORMALIZATION if mode == "imagenet" else Normalization(
        mean=(0.3, 0.25, 0.2), std=(0.2, 0.15, 0.1), mode=mode, percentile_low=2.0, percentile_high=99.5)
    namespace = {"np": np, "image": image, "norm": export.preprocessing(meta(norm))["normalization"]}
    exec(readme_preprocessing(), namespace)
    expected = inference.normalize(image, norm).numpy()[None]
    assert namespace["pixels"].shape == expected.shape
    assert float(np.abs(namespace["pixels"] - expected).max()) <= 1e-5
