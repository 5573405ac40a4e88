"""Train/validation splitting: determinism, grouping, stratification, refusal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segcore.errors import InvalidParameterError
from segcore.splits import split_train_val

IDS = [f"tile_{i:02d}" for i in range(20)]
REPO = Path(__file__).resolve().parents[3]


def test_deterministic_for_a_seed_and_seed_matters() -> None:
    first = split_train_val(IDS, seed=7)
    assert split_train_val(IDS, seed=7) == first
    assert len({tuple(split_train_val(IDS, seed=s).val) for s in range(10)}) > 1


def test_partition_sizes_and_order() -> None:
    split = split_train_val(IDS, seed=1, val_fraction=0.25)
    assert sorted(split.train + split.val) == IDS
    assert not set(split.train) & set(split.val)
    assert len(split.val) == 5
    assert split.train == [t for t in IDS if t in split.train]  # input order kept


def test_independent_of_input_order() -> None:
    forward = split_train_val(IDS, seed=3)
    backward = split_train_val(IDS[::-1], seed=3)
    assert set(forward.val) == set(backward.val)


def test_independent_of_pythonhashseed() -> None:
    code = (
        "from segcore.splits import split_train_val;"
        "ids=[f't{i}' for i in range(30)];"
        "g=[f'img{i % 7}' for i in range(30)];"
        "print(split_train_val(ids, seed=5, groups=g, labels_present=[{i % 3, 0} for i in range(30)]).val)"
    )
    outputs = set()
    for hash_seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_groups_never_straddle() -> None:
    groups = [f"image_{i // 4}" for i in range(20)]  # 5 source images x 4 tiles
    for seed in range(10):
        split = split_train_val(IDS, seed=seed, groups=groups)
        val_groups = {groups[IDS.index(t)] for t in split.val}
        train_groups = {groups[IDS.index(t)] for t in split.train}
        assert val_groups and train_groups
        assert not val_groups & train_groups
        assert len(split.val) == 4  # 20% of 20 tiles = one whole source image


def test_stratification_puts_rare_class_in_both_sides() -> None:
    labels: list[set[int]] = [{0} for _ in IDS]
    labels[3], labels[17] = {0, 2}, {0, 2}  # class 2 in only two tiles
    labels[5], labels[9], labels[11] = {0, 1}, {0, 1}, {0, 1}
    for seed in range(20):
        split = split_train_val(IDS, seed=seed, labels_present=labels)
        for cls in (1, 2):
            in_val = [t for t in split.val if cls in labels[IDS.index(t)]]
            in_train = [t for t in split.train if cls in labels[IDS.index(t)]]
            assert in_val and in_train, (seed, cls)


def test_class_in_a_single_tile_stays_in_training() -> None:
    labels: list[set[int]] = [{0} for _ in IDS]
    labels[4] = {0, 3}
    for seed in range(10):
        assert "tile_04" in split_train_val(IDS, seed=seed, labels_present=labels).train


def test_two_tiles_give_one_each() -> None:
    split = split_train_val(["a", "b"], seed=0, val_fraction=0.01)
    assert len(split.train) == len(split.val) == 1


def test_large_val_fraction_still_leaves_training() -> None:
    split = split_train_val(IDS[:3], seed=0, val_fraction=0.99)
    assert split.train and split.val


@pytest.mark.parametrize(
    "ids, groups, what",
    [
        (["only"], None, "1 tiles"),
        (["a", "b", "c"], ["img", "img", "img"], "1 source images"),
        ([], None, "0 tiles"),
    ],
)
def test_too_few_units_is_refused(ids: list[str], groups: list[str] | None, what: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        split_train_val(ids, seed=0, groups=groups)
    assert info.value.field == "tiles"
    assert "need at least 2 tiles (or 2 source images)" in str(info.value)
    assert f"got {what}" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": float("nan")}, "val_fraction"),
        ({"groups": ["a"]}, "groups"),
        ({"labels_present": [set()]}, "labels_present"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        split_train_val(IDS, seed=0, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_large_inputs_split_quickly() -> None:
    ids = [f"t{i}" for i in range(20_000)]
    started = time.perf_counter()
    split = split_train_val(ids, seed=0, labels_present=[{0, i % 40} for i in range(20_000)])
    assert time.perf_counter() - started < 2.0
    assert len(split.val) == 4_000


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidParameterError):
        split_train_val(["a", "a", "b"], seed=0)
