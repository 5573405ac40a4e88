"""Deterministic train/validation split of tiles.

This module owns how tiles are divided between training and validation:
* deterministic from ``seed`` alone: ``random.Random(seed)`` over *sorted*
  unit keys, so neither PYTHONHASHSEED nor the input order changes the result;
* grouped: tiles cut from the same source image form one unit, and a unit
  never straddles the split (neighbouring tiles are near-duplicates, so
  splitting them would leak training data into validation);
* stratified, best effort: rare classes are placed in validation first, but
  only when training keeps at least one unit with the class;
* never empty: both sides get at least one unit, otherwise
  ``InvalidParameterError("tiles", ...)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from segcore.errors import InvalidParameterError

MIN_UNITS = 2


@dataclass(frozen=True)
class Split:
    """Tile ids per side, each in the order they were given."""

    train: list[str]
    val: list[str]


@dataclass
class _Unit:
    key: str
    tiles: list[str]
    classes: set[int]


def split_train_val(
    tile_ids: Sequence[str],
    *,
    seed: int,
    val_fraction: float = 0.2,
    groups: Sequence[str] | None = None,
    labels_present: Sequence[set[int]] | None = None,
) -> Split:
    """Split tiles into train and validation.

    ``groups[i]`` names the source image of ``tile_ids[i]``; ``labels_present[i]``
    is the set of classes in its mask. About ``val_fraction`` of the tiles go to
    validation (at least one unit, never all units).
    """
    _check_inputs(tile_ids, val_fraction, groups, labels_present)
    units = _make_units(tile_ids, groups, labels_present)
    if len(units) < MIN_UNITS:
        what = "source images" if groups is not None else "tiles"
        raise InvalidParameterError(
            "tiles",
            f"need at least {MIN_UNITS} tiles (or {MIN_UNITS} source images) for a non-empty "
            f"validation split, got {len(units)} {what}",
        )
    random.Random(seed).shuffle(units)
    target = max(1, round(val_fraction * len(tile_ids)))
    val_keys = _fill_to_target(_stratified_pick(units, target), target)
    val_tiles = {t for u in units if u.key in val_keys for t in u.tiles}
    return Split(
        train=[t for t in tile_ids if t not in val_tiles],
        val=[t for t in tile_ids if t in val_tiles],
    )


def _check_inputs(
    tile_ids: Sequence[str],
    val_fraction: float,
    groups: Sequence[str] | None,
    labels_present: Sequence[set[int]] | None,
) -> None:
    if not (math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise InvalidParameterError("val_fraction", f"must be in (0, 1), got {val_fraction}")
    if len(set(tile_ids)) != len(tile_ids):
        raise InvalidParameterError("tile_ids", "tile ids must be unique")
    if groups is not None and len(groups) != len(tile_ids):
        raise InvalidParameterError("groups", f"expected {len(tile_ids)} entries, got {len(groups)}")
    if labels_present is not None and len(labels_present) != len(tile_ids):
        raise InvalidParameterError(
            "labels_present", f"expected {len(tile_ids)} entries, got {len(labels_present)}"
        )


def _make_units(
    tile_ids: Sequence[str],
    groups: Sequence[str] | None,
    labels_present: Sequence[set[int]] | None,
) -> list[_Unit]:
    by_key: dict[str, _Unit] = {}
    for i, tile in enumerate(tile_ids):
        key = groups[i] if groups is not None else tile
        unit = by_key.setdefault(key, _Unit(key=key, tiles=[], classes=set()))
        unit.tiles.append(tile)
        if labels_present is not None:
            unit.classes |= set(labels_present[i])
    # Sorting before the seeded shuffle makes the split independent of input order.
    return [by_key[k] for k in sorted(by_key)]


class _Picker:
    """Validation picks with per-class counts of units still in training.

    Counting keeps each "would this empty a class from training?" check O(classes)
    instead of a scan over all units, so splitting tens of thousands of tiles is instant.
    """

    def __init__(self, units: list[_Unit]) -> None:
        self.units = units
        self.val: set[str] = set()
        self.val_tiles = 0
        self.train_count: dict[int, int] = {}
        for unit in units:
            for cls in unit.classes:
                self.train_count[cls] = self.train_count.get(cls, 0) + 1

    def can_move(self, unit: _Unit) -> bool:
        # Never take the last training example of any of the unit's classes.
        return unit.key not in self.val and all(self.train_count[c] >= 2 for c in unit.classes)

    def move(self, unit: _Unit) -> None:
        self.val.add(unit.key)
        self.val_tiles += len(unit.tiles)
        for cls in unit.classes:
            self.train_count[cls] -= 1

    def room_left(self, target: int) -> bool:
        return self.val_tiles < target and len(self.val) < len(self.units) - 1


def _stratified_pick(units: list[_Unit], target: int) -> _Picker:
    """Put one unit per class into validation, rarest class first."""
    picker = _Picker(units)
    frequency = dict(picker.train_count)
    covered: set[int] = set()
    # Rarest first: those have the fewest candidate units, so they get first pick.
    for cls in sorted(frequency, key=lambda c: (frequency[c], c)):
        if not picker.room_left(target):
            break
        if cls in covered:
            continue
        candidates = [u for u in units if cls in u.classes and picker.can_move(u)]
        if candidates:
            # Smallest candidate first keeps the validation share close to the target.
            unit = min(candidates, key=lambda u: len(u.tiles))
            picker.move(unit)
            covered |= unit.classes
    return picker


def _fill_to_target(picker: _Picker, target: int) -> set[str]:
    # Groups come in whole; allow overshooting the target by half rather than
    # skipping every group when they are all larger than the remaining room.
    limit = math.ceil(target * 1.5)
    for unit in picker.units:  # already in seeded-shuffled order
        if not picker.room_left(target):
            break
        if picker.val_tiles + len(unit.tiles) <= limit and picker.can_move(unit):
            picker.move(unit)
    if not picker.val:
        # No unit fitted the target; the smallest one still gives a validation set.
        picker.move(min(picker.units, key=lambda u: len(u.tiles)))
    return picker.val
