"""The architectures segcore can train, as facts that need no torch: name, description, parameter
count and the memory figure admission uses. The pipeline service lists and validates
architectures from here without importing torch or transformers; segcore.architectures builds
the networks, and a test checks that its builders and these facts agree (names, parameter counts
counted on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    description: str
    parameter_count: int  # counted with 2 labels; each extra label adds the head's width + 1
    # Activation bytes per training pixel of one tile (CPU, float32): peak resident memory of
    # forward, backward and an AdamW step at 128² and 256², batch 2, the difference per pixel.
    activation_bytes_per_pixel: int


_ENTRIES = (
    ArchitectureInfo("upernet-convnext-base",
                     "UperNet + ConvNeXt-base (depths 3-3-27-3, widths 128-1024), ~121M params.",
                     120_808_322, 9_569),
    ArchitectureInfo("upernet-convnext-small",
                     "UperNet + ConvNeXt-small (depths 3-3-27-3, widths 96-768), ~81M params.",
                     80_877_474, 6_069),
    ArchitectureInfo("upernet-convnext-tiny",
                     "UperNet + ConvNeXt-tiny (depths 3-3-9-3, widths 96-768), ~59M params.",
                     59_242_914, 5_031),
    ArchitectureInfo("upernet-convnext-cpu",
                     "Tiny UperNet + ConvNeXt (depths 1-1-1-1, widths 16-128) for CPU runs and tests, ~0.4M params.",
                     391_794, 483),
    ArchitectureInfo("upernet-resnet18", "UperNet + timm ResNet-18 (stride 4-32 features), ~19M params.",
                     19_489_858, 2_393),
    ArchitectureInfo("upernet-convnextv2-atto", "UperNet + timm ConvNeXt-V2-atto (widths 40-320), ~6M params.",
                     5_580_426, 2_375),
)
CATALOGUE: dict[str, ArchitectureInfo] = {a.name: a for a in sorted(_ENTRIES, key=lambda a: a.name)}


def architecture_names() -> list[str]:
    """Every architecture's name, sorted."""
    return list(CATALOGUE)


def list_architectures() -> list[ArchitectureInfo]:
    """Every architecture, sorted by name."""
    return list(CATALOGUE.values())
