"""Segmentation losses and class weighting.

This module owns the training objective: cross-entropy, soft Dice, or their
sum, all skipping pixels marked with the ignore index (unlabelled or padding).
Losses are computed in float32 even under bf16 autocast, because the softmax
of low-precision logits loses the small probabilities Dice and CE depend on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segcore.hyperparameters import LOSSES

_DICE_SMOOTH = 1.0  # keeps classes absent from a batch from producing 0/0


def class_weights_from_masks(
    masks: Sequence[torch.Tensor], num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Inverse square-root pixel frequency, scaled to mean 1 over present classes.

    Square root rather than plain inverse frequency: a class covering 0.1% of
    pixels would otherwise get a 1000x weight and make training unstable.
    Classes absent from training get weight 1 (they never occur as targets).
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for mask in masks:
        labelled = mask[mask != ignore_index].reshape(-1)
        counts += torch.bincount(labelled, minlength=num_classes)[:num_classes].double()
    return class_weights_from_counts(counts)


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``class_weights_from_masks`` from the labelled pixel count of each class."""
    counts = counts.double()
    num_classes = counts.numel()
    weights = torch.ones(num_classes, dtype=torch.float64)
    present = counts > 0
    if present.any():
        freq = counts[present] / counts.sum()
        inv = freq.rsqrt()
        weights[present] = inv / inv.mean()
    return weights.float()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    *,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Loss of ``B x C x h x w`` logits against a ``B x H x W`` target.

    Logits are bilinearly resized to the target when their size differs (some
    heads predict at a reduced stride). Class weights apply to the CE term only.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = logits.new_zeros(())
    if kind in ("ce", "ce+dice"):
        loss = loss + _cross_entropy(logits, target, valid, class_weights, ignore_index)
    if kind in ("dice", "ce+dice"):
        loss = loss + dice_loss(logits, safe_target, valid)
    return loss


def _cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    # F.cross_entropy's "mean" returns NaN when every pixel is ignored (0/0);
    # a "sum" divided by a clamped weight total returns 0 instead.
    total = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore_index, reduction="sum")
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    pixel_weight = valid.float() if weights is None else weights[safe_target] * valid
    return total / pixel_weight.sum().clamp_min(1e-6)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - mean_c Dice_c`` of softmax probabilities over the whole batch."""
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1) * valid.unsqueeze(1)
    one_hot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot * valid.unsqueeze(1)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + _DICE_SMOOTH) / (cardinality + _DICE_SMOOTH)
    return 1.0 - dice.mean()
