"""Model export/import and training-state serialisation."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from segcore.architectures import build_model
from segcore.checkpoint import (
    ModelMeta,
    environment_info,
    export_model,
    load_model,
    load_training_state,
    model_meta_for,
    read_model_meta,
    save_training_state,
)
from segcore.errors import IncompatibleModelError
from segcore.inference import predict_mask
from segcore.training import Sample, TrainConfig, TrainResult

Trained = tuple[TrainConfig, TrainResult, list[Sample]]


def test_export_load_round_trip_gives_identical_predictions(trained_discs: Trained) -> None:
    config, result, val = trained_discs
    meta = model_meta_for(config, result, tile_size=48, extra={"job": "abc"})
    assert result.best_state is not None
    data = export_model(result.best_state, meta)

    model, loaded_meta = load_model(data)

    assert loaded_meta == meta
    assert (
        loaded_meta.best_epoch == result.best_epoch
        and loaded_meta.normalization == result.normalization.to_dict()
    )
    assert not model.training
    original = build_model(config.architecture, config.num_classes)
    original.load_state_dict(result.best_state)
    for sample in val[:3]:
        expected = predict_mask(original, sample.image, result.normalization)
        got = predict_mask(model, sample.image, result.normalization)
        np.testing.assert_array_equal(got, expected)


def test_meta_is_readable_without_tensors(trained_discs: Trained) -> None:
    config, result, _ = trained_discs
    data = export_model(result.final_state, model_meta_for(config, result))
    meta = read_model_meta(data)
    assert meta.architecture == "upernet-convnext-cpu"
    assert meta.class_names == ["background", "disc"]
    assert meta.seed == 0 and meta.device == "cpu"
    assert set(meta.versions) >= {"torch", "transformers", "timm", "device"}


def test_unknown_meta_keys_from_newer_writers_are_ignored() -> None:
    meta = ModelMeta.from_dict({"architecture": "a", "class_names": ["x"], "normalization": {}, "future": 1})
    assert meta.architecture == "a"


def test_corrupt_or_foreign_model_bytes_are_refused(trained_discs: Trained) -> None:
    config, result, _ = trained_discs
    good = export_model(result.final_state, model_meta_for(config, result))
    for data in (b"", b"garbage bytes", good[:100], save_safetensors({"w": torch.zeros(2)})):
        with pytest.raises(IncompatibleModelError):
            load_model(data)


def test_weights_that_do_not_fit_the_architecture_are_refused() -> None:
    other = build_model("upernet-convnextv2-atto", 2).state_dict()
    meta = ModelMeta("upernet-convnext-cpu", ["background", "disc"], {"mean": [0.5] * 3, "std": [0.2] * 3})
    with pytest.raises(IncompatibleModelError, match="do not fit"):
        load_model(export_model(other, meta))
    unknown = ModelMeta("upernet-gone", ["background", "disc"], meta.normalization)
    with pytest.raises(IncompatibleModelError, match="upernet-gone"):
        load_model(export_model(other, unknown))


def test_metadata_lives_in_the_safetensors_header(trained_discs: Trained) -> None:
    config, result, _ = trained_discs
    data = export_model(result.final_state, model_meta_for(config, result))
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    assert json.loads(header["__metadata__"]["segcore_meta"])["class_names"] == ["background", "disc"]


def test_training_state_bytes_are_weights_only_loadable(trained_discs: Trained) -> None:
    import io

    from segcore.state import TrainingState

    state = TrainingState(
        epoch=1,
        model_state={"w": torch.ones(2)},
        optimizer_state={"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        scheduler_state={"last_epoch": 3},
        rng_state={"python": [3, [1, 2], None]},
        best_epoch=1,
        best_val_iou=0.5,
        best_model_state=None,
        history=trained_discs[1].history[:2],
        normalization={"mean": [0.1] * 3, "std": [0.2] * 3},
        config={"architecture": "x"},
    )
    data = save_training_state(state)
    torch.load(io.BytesIO(data), weights_only=True)  # no custom classes inside
    loaded = load_training_state(data)
    assert loaded.history == state.history
    assert torch.equal(loaded.model_state["w"], state.model_state["w"])
    with pytest.raises(IncompatibleModelError):
        load_training_state(b"not a state")


def test_environment_info() -> None:
    info = environment_info("cpu")
    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu"
