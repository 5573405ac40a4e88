"""Registry of segmentation architectures and pretrained-backbone loading.

This module owns *how* the networks segcore can train are built (which exist, with their
descriptions and parameter counts, is segcore.catalogue, which needs no torch). Architectures are plain
builder functions ``(num_labels) -> nn.Module`` decorated with
``@register_architecture``; the registered name is the function name with
underscores turned into hyphens (``upernet_convnext_base`` ->
``"upernet-convnext-base"``), so ``grep register_architecture`` lists them all.

Every builder returns a transformers ``UperNetForSemanticSegmentation`` built
from a config object, never from the hub: training machines are offline and a
silent download would make builds non-reproducible.

Choices:
* The UperNet auxiliary (FCN) head is OFF. segcore computes its own loss from
  the main logits (CE / Dice), so the auxiliary logits would cost compute and
  parameters without ever receiving a gradient.
* ``load_pretrained_backbone`` copies user-provided weights (a local
  ``save_pretrained`` directory, a ``.safetensors``/``.bin`` file, or the raw
  bytes of either) into ``model.backbone``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from transformers import (
    ConvNextConfig,
    PreTrainedConfig,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from segcore.catalogue import CATALOGUE
from segcore.errors import IncompatibleModelError, UnknownArchitectureError

Builder = Callable[[int], torch.nn.Module]



@dataclass(frozen=True)
class _Entry:
    builder: Builder
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_architecture(fn: Builder) -> Builder:
    """Register ``fn`` under its function name (underscores -> hyphens)."""
    name = fn.__name__.replace("_", "-")
    if name in _REGISTRY:
        # Two builders with the same name would make the registry order-dependent.
        raise ValueError(f"architecture {name!r} registered twice")
    if name not in CATALOGUE:
        raise ValueError(f"architecture {name!r} has no entry in segcore.catalogue")
    _REGISTRY[name] = _Entry(builder=fn, description=CATALOGUE[name].description)
    return fn


def architecture_names() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(name, architecture_names()) from None


def build_model(name: str, num_labels: int) -> torch.nn.Module:
    """Build a randomly initialised model; raises UnknownArchitectureError."""
    entry = _entry(name)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    return entry.builder(num_labels)


# --------------------------------------------------------------------------- builders

_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _upernet_convnext(
    num_labels: int, depths: list[int], hidden_sizes: list[int], head_size: int
) -> torch.nn.Module:
    # transformers 5.x: hidden_sizes must be a list (a tuple crashes the config),
    # and out_features must name all four stages (the default, last stage only,
    # breaks UperNet's four-level FPN).
    # (type: ignore: transformers' strict-dataclass stubs hide the out_features property setter.)
    backbone = ConvNextConfig(
        depths=list(depths),
        hidden_sizes=list(hidden_sizes),
        out_features=list(_STAGES),  # type: ignore[call-arg]
    )
    return _upernet(num_labels, backbone, head_size)


def _upernet_timm(num_labels: int, timm_name: str, out_indices: list[int], head_size: int) -> torch.nn.Module:
    # The backbone name goes into TimmBackboneConfig only. Passing backbone=... or
    # use_timm_backbone to UperNetConfig makes transformers fetch pretrained
    # weights from the hub. TimmBackbone calls timm with pretrained=False.
    backbone = TimmBackboneConfig(backbone=timm_name, out_indices=list(out_indices))  # type: ignore[call-arg]
    return _upernet(num_labels, backbone, head_size)


def _upernet(num_labels: int, backbone: PreTrainedConfig, head_size: int) -> torch.nn.Module:
    config = UperNetConfig(
        backbone_config=backbone,
        hidden_size=head_size,
        num_labels=num_labels,  # type: ignore[call-arg]  # inherited PreTrainedConfig kwarg
        use_auxiliary_head=False,
    )
    return UperNetForSemanticSegmentation(config)


@register_architecture
def upernet_convnext_base(num_labels: int) -> torch.nn.Module:
    """UperNet + ConvNeXt-base (depths 3-3-27-3, widths 128-1024), ~121M params."""
    return _upernet_convnext(num_labels, [3, 3, 27, 3], [128, 256, 512, 1024], 512)


@register_architecture
def upernet_convnext_small(num_labels: int) -> torch.nn.Module:
    """UperNet + ConvNeXt-small (depths 3-3-27-3, widths 96-768), ~81M params."""
    return _upernet_convnext(num_labels, [3, 3, 27, 3], [96, 192, 384, 768], 512)


@register_architecture
def upernet_convnext_tiny(num_labels: int) -> torch.nn.Module:
    """UperNet + ConvNeXt-tiny (depths 3-3-9-3, widths 96-768), ~59M params."""
    return _upernet_convnext(num_labels, [3, 3, 9, 3], [96, 192, 384, 768], 512)


@register_architecture
def upernet_convnext_cpu(num_labels: int) -> torch.nn.Module:
    """Tiny UperNet + ConvNeXt (depths 1-1-1-1, widths 16-128) for CPU runs and tests, ~0.4M params."""
    return _upernet_convnext(num_labels, [1, 1, 1, 1], [16, 32, 64, 128], 32)


@register_architecture
def upernet_resnet18(num_labels: int) -> torch.nn.Module:
    """UperNet + timm ResNet-18 (stride 4-32 features), ~19M params."""
    # timm's resnet feature index 0 is the stride-2 stem; UperNet wants strides 4..32.
    return _upernet_timm(num_labels, "resnet18", [1, 2, 3, 4], 256)


@register_architecture
def upernet_convnextv2_atto(num_labels: int) -> torch.nn.Module:
    """UperNet + timm ConvNeXt-V2-atto (widths 40-320), ~6M params."""
    return _upernet_timm(num_labels, "convnextv2_atto", [0, 1, 2, 3], 128)


# ------------------------------------------------------------------ pretrained backbones

# Wrapper prefixes that other save formats put in front of backbone keys:
# UperNet ("backbone."), ConvNextFor* ("convnext."), DDP ("module."), ours/others.
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "convnext.", "_backbone.")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class PretrainedLoadReport:
    """Which backbone tensors ``load_pretrained_backbone`` filled in."""

    loaded: list[str]
    missing: list[str] = field(default_factory=list)  # backbone keys left at init
    unexpected: list[str] = field(default_factory=list)  # source keys not used


def load_pretrained_backbone(
    model: torch.nn.Module, source: str | os.PathLike[str] | bytes
) -> PretrainedLoadReport:
    """Copy pretrained weights into ``model.backbone`` (in place).

    ``source`` is a ``save_pretrained`` directory, a ``.safetensors`` or torch
    state-dict file, or the bytes of one. Keys are matched after stripping
    wrapper prefixes, so a saved ConvNextModel, ConvNextBackbone or a whole
    UperNet all work. Raises IncompatibleModelError when nothing matches or a
    matched tensor has the wrong shape (a different backbone size).
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        raise IncompatibleModelError("model has no .backbone module to load weights into")
    source_state = _read_state_dict(source)
    target = backbone.state_dict()
    matched, unexpected = _match_keys(source_state, target)
    if not matched:
        raise IncompatibleModelError(
            f"no pretrained tensor matches the backbone (source keys e.g. {list(source_state)[:3]})"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in matched.items()
        if v.shape != target[k].shape
    ]
    if bad:
        raise IncompatibleModelError("pretrained shapes differ from backbone: " + "; ".join(bad[:5]))
    backbone.load_state_dict(matched, strict=False)
    missing = sorted(set(target) - set(matched))
    return PretrainedLoadReport(loaded=sorted(matched), missing=missing, unexpected=unexpected)


def _normalise_key(key: str) -> str:
    # timm's features_only wrapper flattens "stages.0" into "stages_0"; comparing
    # keys with dots and underscores unified lets raw timm weights match.
    return key.replace(".", "_")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _match_keys(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    index = {_normalise_key(_strip_prefixes(k)): k for k in target}
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in source.items():
        hit = index.get(_normalise_key(_strip_prefixes(key)))
        if hit is None:
            unexpected.append(key)
        else:
            matched[hit] = tensor
    return matched, unexpected


def _read_state_dict(source: str | os.PathLike[str] | bytes) -> dict[str, torch.Tensor]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _state_dict_from_bytes(bytes(source), "<bytes>")
    path = Path(source)
    if path.is_dir():
        return _state_dict_from_dir(path)
    if not path.is_file():
        raise IncompatibleModelError(f"pretrained weights not found: {path}")
    return _state_dict_from_bytes(path.read_bytes(), str(path))


def _state_dict_from_dir(path: Path) -> dict[str, torch.Tensor]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        # Sharded save_pretrained output: the index maps tensor -> shard file.
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_state_dict_from_bytes((path / shard).read_bytes(), shard))
        return state
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return _state_dict_from_bytes((path / name).read_bytes(), str(path / name))
    raise IncompatibleModelError(f"no {' or '.join(_WEIGHT_FILES)} in directory {path}")


def _state_dict_from_bytes(data: bytes, origin: str) -> dict[str, torch.Tensor]:
    # torch.save archives are zip files; everything else is tried as safetensors.
    try:
        if data[:2] == b"PK":
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            state = load_safetensors_bytes(data)
    except Exception as exc:  # any parse failure means unusable input
        raise IncompatibleModelError(f"cannot read pretrained weights {origin}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]  # common wrapper in training checkpoints
    if not isinstance(state, Mapping):
        raise IncompatibleModelError(f"pretrained weights {origin} are not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
