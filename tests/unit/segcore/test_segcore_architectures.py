"""Architecture registry, offline builds, forward passes, pretrained-backbone loading."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as save_safetensors
from transformers import ConvNextBackbone, ConvNextConfig, ConvNextModel

from segcore import catalogue
from segcore.architectures import architecture_names, build_model, load_pretrained_backbone
from segcore.errors import IncompatibleModelError, UnknownArchitectureError
from segcore.hyperparameters import DEFAULT_ARCHITECTURE

EXPECTED = {
    "upernet-convnext-base",
    "upernet-convnext-small",
    "upernet-convnext-tiny",
    "upernet-convnext-cpu",
    "upernet-resnet18",
    "upernet-convnextv2-atto",
}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def test_registry_names_and_default() -> None:
    assert set(architecture_names()) == EXPECTED
    assert architecture_names() == sorted(architecture_names())
    assert DEFAULT_ARCHITECTURE == "upernet-convnext-base"


def test_the_catalogue_lists_what_is_built_with_its_real_parameter_count() -> None:
    """The torch-free catalogue (what the pipeline lists and admission counts) against the builders,
    counted on the meta device."""
    assert catalogue.architecture_names() == architecture_names()
    for name in architecture_names():
        with torch.device("meta"):
            model = build_model(name, 2)
        assert sum(p.numel() for p in model.parameters()) == catalogue.CATALOGUE[name].parameter_count, name


def test_catalogue_facts() -> None:
    infos = {info.name: info for info in catalogue.list_architectures()}
    assert set(infos) == EXPECTED
    assert 350_000 < infos["upernet-convnext-cpu"].parameter_count < 450_000
    assert 100_000_000 < infos["upernet-convnext-base"].parameter_count < 140_000_000
    assert infos["upernet-convnext-base"].parameter_count > infos["upernet-convnext-small"].parameter_count
    assert all(info.description for info in infos.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_architecture_builds_offline_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 2).eval()
    listed = catalogue.CATALOGUE[name].parameter_count
    assert sum(p.numel() for p in model.parameters()) == listed
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, 64, 64)).logits
    assert logits.shape == (2, 2, 64, 64)
    assert torch.isfinite(logits).all()


def test_num_labels_sets_output_channels() -> None:
    model = build_model("upernet-convnext-cpu", 5).eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape[1] == 5


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        build_model("upernet-convnext-huge", 2)
    assert info.value.name == "upernet-convnext-huge"
    assert set(info.value.valid) == EXPECTED
    assert "upernet-convnext-cpu" in str(info.value)


# ---------------------------------------------------------------------------- pretrained


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    backbone = model.backbone
    assert isinstance(backbone, torch.nn.Module)
    return backbone


def _backbone_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor], prefix: str = "") -> bool:
    state = _backbone(model).state_dict()
    return all(torch.equal(state[prefix + k], v) for k, v in reference.items())


def _cpu_backbone_config() -> ConvNextConfig:
    return ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], out_features=STAGES)  # type: ignore[call-arg]


def test_pretrained_from_save_pretrained_directory(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = ConvNextBackbone(_cpu_backbone_config())
    source.save_pretrained(tmp_path)
    torch.manual_seed(2)
    model = build_model("upernet-convnext-cpu", 2)
    head_before = {k: v.clone() for k, v in model.get_submodule("decode_head").state_dict().items()}
    assert not _backbone_equal(model, source.state_dict())

    report = load_pretrained_backbone(model, tmp_path)

    assert _backbone_equal(model, source.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source.state_dict())
    head_after = model.get_submodule("decode_head").state_dict()
    assert all(torch.equal(head_after[k], v) for k, v in head_before.items())  # head untouched


def test_pretrained_from_convnext_model_reports_missing_norms(tmp_path: Path) -> None:
    # ConvNextModel (no per-stage norms) is what image-classification checkpoints contain.
    source = ConvNextModel(_cpu_backbone_config())
    source.save_pretrained(tmp_path)
    model = build_model("upernet-convnext-cpu", 2)
    report = load_pretrained_backbone(model, tmp_path)
    assert any(k.startswith("hidden_states_norms") for k in report.missing)
    assert any(k.startswith("layernorm") for k in report.unexpected)
    assert _backbone_equal(model, {k: v for k, v in source.state_dict().items() if k.startswith("encoder")})


def test_pretrained_from_safetensors_and_torch_bytes_of_a_whole_model() -> None:
    torch.manual_seed(3)
    trained = build_model("upernet-convnext-cpu", 4)  # different head size: irrelevant for the backbone
    reference = _backbone(trained).state_dict()
    as_safetensors = save_safetensors({k: v.contiguous() for k, v in trained.state_dict().items()})
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    for data in (as_safetensors, buffer.getvalue()):
        model = build_model("upernet-convnext-cpu", 2)
        load_pretrained_backbone(model, data)
        assert _backbone_equal(model, reference)


@pytest.mark.parametrize(
    "timm_name, arch", [("resnet18", "upernet-resnet18"), ("convnextv2_atto", "upernet-convnextv2-atto")]
)
def test_pretrained_raw_timm_weights(timm_name: str, arch: str) -> None:
    torch.manual_seed(4)
    timm_model = timm.create_model(timm_name, pretrained=False)
    data = save_safetensors({k: v.contiguous() for k, v in timm_model.state_dict().items()})
    model = build_model(arch, 2)
    report = load_pretrained_backbone(model, data)
    assert report.missing == []  # every backbone tensor came from the timm checkpoint
    first = next(k for k in timm_model.state_dict() if k.endswith("weight"))
    loaded = dict(_backbone(model).named_parameters())
    match = [v for k, v in loaded.items() if k.replace(".", "_").endswith(first.replace(".", "_"))]
    assert match and torch.equal(match[0], timm_model.state_dict()[first])


def test_pretrained_shape_mismatch_and_no_match_are_refused(tmp_path: Path) -> None:
    small = ConvNextBackbone(
        ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], out_features=STAGES)  # type: ignore[call-arg]
    )
    small.save_pretrained(tmp_path)
    model = build_model("upernet-convnext-cpu", 2)
    with pytest.raises(IncompatibleModelError, match="shapes differ"):
        load_pretrained_backbone(model, tmp_path)
    unrelated = save_safetensors({"foo.bar": torch.zeros(3)})
    with pytest.raises(IncompatibleModelError, match="no pretrained tensor"):
        load_pretrained_backbone(model, unrelated)
    with pytest.raises(IncompatibleModelError):
        load_pretrained_backbone(model, b"not weights at all")
    with pytest.raises(IncompatibleModelError, match="not found"):
        load_pretrained_backbone(model, tmp_path / "missing.safetensors")
