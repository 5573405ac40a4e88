"""Admission's memory estimate: every architecture has its figures, and a refusal names what to change."""

from __future__ import annotations

from segcore import admission
from segcore.hyperparameters import DEFAULTS


def test_the_estimate_grows_with_the_share_of_the_batch_and_the_training_size() -> None:
    shape = admission.JobShape("upernet-convnext-tiny", batch_size=8, crop_size=None, tile_size=512)
    one, two = shape.need(), admission.JobShape("upernet-convnext-tiny", 8, None, 512, processes=2).need()
    assert one.tiles_per_process == 8 and two.tiles_per_process == 4 and two.per_process < one.per_process
    cropped = admission.JobShape("upernet-convnext-tiny", 8, 128, 512).need()
    assert cropped.side == 128 and cropped.per_process < one.per_process
    assert shape.need("cuda").per_process < one.per_process  # bf16 activations
    # CPU processes share the node's memory; CUDA processes each have a GPU.
    two_procs = admission.JobShape("upernet-convnext-tiny", 8, None, 512, processes=2)
    assert two_procs.on_node("cpu") == 2 * two.per_process and two_procs.on_node("cuda:0") == two_procs.need(
        "cuda").per_process


def test_a_refusal_names_the_batch_then_the_crop_then_the_architecture() -> None:
    gb = 2**30
    assert admission.JobShape(DEFAULTS["architecture"], 8, None, 256).refusal(64 * gb) is None
    field, reason = admission.JobShape("upernet-convnext-base", 64, None, 512).refusal(16 * gb)  # type: ignore[misc]
    assert field == "batch_size" and "16.0 GB" in reason and "lower the batch size" in reason
    field, _ = admission.JobShape("upernet-convnext-base", 1, None, 8192).refusal(16 * gb)  # type: ignore[misc]
    assert field == "crop_size"
    field, _ = admission.JobShape("upernet-convnext-base", 1, None, 256).refusal(2 * gb)  # type: ignore[misc]
    assert field == "architecture"
    # Unknown offers are judged against more than any machine has.
    assert admission.JobShape("upernet-convnext-cpu", 8, None, 256).refusal(None) is None
    field, reason = admission.JobShape("upernet-convnext-cpu", 4096, 8192, 8192).refusal(None)  # type: ignore[misc]
    assert field == "batch_size" and "more than any machine has" in reason
