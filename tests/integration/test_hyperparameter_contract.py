"""The one hyperparameter contract (segcore.hyperparameters) holds on both sides: for every bound,
a value just inside is accepted by CreateJob (real gRPC) and by TrainConfig, and a value just
outside is refused by both, naming the field. The proto, TrainConfig and the CLI carry exactly the
contract's parameters and defaults, and "auto" normalization is resolved and explained."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.cli.main import build_parser
from clients.sdk import Client
from segcore import hyperparameters as contract
from segcore import regimes
from segcore.errors import InvalidParameterError, SegcoreError, UnknownArchitectureError
from segcore.training import TrainConfig
from tests.helpers import error_of, violation_fields

CPU_ARCH = "upernet-convnext-cpu"


def _edges(p: contract.Parameter) -> list[tuple[object, bool]]:
    """(value, accepted) just inside and just outside every bound of `p`, and for its choices."""
    cases: list[tuple[object, bool]] = []
    if p.kind is int:
        assert p.minimum is not None and p.maximum is not None
        cases += [(int(p.minimum), True), (int(p.minimum) - 1, False), (int(p.maximum), True),
                  (int(p.maximum) + 1, False)]
    elif p.kind is float:
        assert p.minimum is not None and p.maximum is not None
        low, high = float(p.minimum), float(p.maximum)
        inside_low = math.nextafter(low, math.inf) if p.exclusive_minimum else low
        inside_high = math.nextafter(high, -math.inf) if p.exclusive_maximum else high
        outside_low = low if p.exclusive_minimum else math.nextafter(low, -math.inf)
        outside_high = high if p.exclusive_maximum else math.nextafter(high, math.inf)
        cases += [(inside_low, True), (outside_low, False), (inside_high, True), (outside_high, False),
                  (math.nan, False), (math.inf, False)]
    elif p.choices is not None:
        cases += [(choice, True) for choice in p.choices] + [("no-such-" + p.name, False)]
    elif p.architecture:
        cases += [(CPU_ARCH, True), ("no-such-architecture", False)]
    return cases


CASES = [(p.name, value, ok) for p in contract.PARAMETERS for value, ok in _edges(p)]


def test_every_bound_holds_at_create_job_and_in_train_config(client: Client, training_set: pb.TrainingSet) -> None:
    assert len(CASES) > 60
    for name, value, accepted in CASES:
        request = common_pb2.Hyperparameters(architecture=CPU_ARCH)
        setattr(request, name, value)
        if accepted:
            job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=request)
            resolved = name == "normalization" and value == "auto"  # CreateJob stores the concrete choice
            assert getattr(job.hyperparameters, name) == value or resolved, (name, value)
        else:
            error = error_of(client.create_job, pipeline="segmentation", training_set=training_set.name,
                             hyperparameters=request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, value)
            assert violation_fields(error) == {f"hyperparameters.{name}"}, (name, value)
        config = TrainConfig(class_names=["background", "x"], **{"architecture": CPU_ARCH, name: value})
        if accepted:
            config.validate()
        else:
            with pytest.raises(SegcoreError) as info:
                config.validate()
            if name == "architecture":
                assert isinstance(info.value, UnknownArchitectureError), value
            else:
                assert isinstance(info.value, InvalidParameterError) and info.value.field == name, (name, value)


def test_the_issue_examples_are_refused_at_create_job(client: Client, training_set: pb.TrainingSet) -> None:
    for name, value in [("crop_size", 20), ("seed", 2**33)]:
        error = error_of(client.create_job, pipeline="segmentation", training_set=training_set.name,
                         hyperparameters=common_pb2.Hyperparameters(**{name: value}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(error) == {f"hyperparameters.{name}"}
        with pytest.raises(InvalidParameterError) as info:
            TrainConfig(class_names=["background", "x"], **{name: value}).validate()  # type: ignore[arg-type]
        assert info.value.field == name


def test_proto_train_config_and_cli_carry_exactly_the_contract() -> None:
    names = [p.name for p in contract.PARAMETERS]
    assert [f.name for f in common_pb2.Hyperparameters.DESCRIPTOR.fields] == names
    config_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {n: config_fields[n] for n in names} == contract.DEFAULTS
    for p in contract.PARAMETERS:  # each default has its parameter's type and passes its own bounds
        assert (p.default is None and p.optional) or type(p.default) is p.kind, p.name
        assert p.violation(p.default, [contract.DEFAULT_ARCHITECTURE]) is None, p.name
    assert set(config_fields) - set(names) == {"class_names", "device", "num_threads", "data_workers",
                                                     "prepared_cache_mb"}
    parser = build_parser()
    args = parser.parse_args(["jobs", "create", "--pipeline", "p", "--training-set", "s", "--no-augment",
                              "--class-weights", "--checkpoint-every", "3", "--normalization", "percentile",
                              "--warmup-fraction", "0.1", "--percentile-low", "0.5", "--percentile-high", "99.5",
                              "--crop-size", "64", "--early-stopping-patience", "4", "--loss", "dice"])
    assert (args.augment, args.class_weights, args.checkpoint_every, args.normalization) == (
        False, True, 3, "percentile")
    untouched = parser.parse_args(["jobs", "create", "--pipeline", "p", "--training-set", "s"])
    assert all(getattr(untouched, n) is None for n in names)  # unset flags take the pipeline's defaults


def test_pipelines_store_only_their_overrides(client: Client, training_set: pb.TrainingSet) -> None:
    created = client.pipeline.CreatePipeline(pb.CreatePipelineRequest(pipeline_id="tuned", pipeline=pb.Pipeline(
        display_name="tuned", type=pb.Pipeline.TYPE_TRAINING, class_names=["background", "nucleus", "debris"],
        tile_size=64, default_hyperparameters=common_pb2.Hyperparameters(epochs=3, loss="ce"))))
    shown = created.default_hyperparameters
    assert (shown.epochs, shown.loss, shown.batch_size, shown.normalization) == (3, "ce", 8, "auto")
    job = client.create_job(pipeline="tuned", training_set=training_set.name,
                            hyperparameters=common_pb2.Hyperparameters(batch_size=2))
    p = job.hyperparameters
    assert (p.epochs, p.loss, p.batch_size, p.learning_rate, p.augment) == (3, "ce", 2, 0.001, True)
    assert not p.HasField("crop_size")  # optional parameters stay unset


def test_auto_normalization_is_resolved_at_create_job_and_explained(client: Client, training_set: pb.TrainingSet,
                                                                    tmp_path: Path) -> None:
    rgb = client.create_job(pipeline="segmentation", training_set=training_set.name)
    assert rgb.hyperparameters.normalization == "dataset"
    assert rgb.normalization_reason.startswith("auto chose dataset: uint8 multi-channel")
    tiles = regimes.generate_regime("fluorescence-16bit", 12, tile_size=64)
    regimes.write_regime_set(tiles, tmp_path / "f" / "tiles", tmp_path / "f" / "masks")
    fluorescence = client.create_training_set("nuclei", tmp_path / "f" / "tiles", tmp_path / "f" / "masks",
                                              class_names=regimes.class_names("fluorescence-16bit"),
                                              group_by=r"^(.*)_tile")
    profile = fluorescence.report.image_profile
    assert profile.recorded and list(profile.pixel_types) == ["uint16"] and profile.single_channel
    assert profile.max_value < 0.01 * 65535
    job = client.create_job(pipeline="segmentation", training_set=fluorescence.name)
    assert job.hyperparameters.normalization == "percentile"
    assert "uint16 single-channel" in job.normalization_reason and "% of the uint16 range" in job.normalization_reason
    asked = client.create_job(pipeline="segmentation", training_set=fluorescence.name,
                              hyperparameters=common_pb2.Hyperparameters(normalization="dataset"))
    assert (asked.hyperparameters.normalization, asked.normalization_reason) == ("dataset", "dataset: asked for")
