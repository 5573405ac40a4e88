"""Tiles streamed into training (segcore.tiles): loaded when their batch comes up, in worker
processes when asked, with results that do not depend on how the data was loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.data import Sample
from segcore.errors import InvalidTileError
from segcore.intensity import ScalingKey, measure_scalings
from segcore.metrics import IGNORE_INDEX
from segcore.tiles import KnownMeasures, scan
from segcore.training import train
from tests.unit.segcore.segcore_testutil import DiscFactory, cpu_config


class CountingSource:
    """A tile source that decodes on access, and counts the accesses (a stand-in for object storage)."""

    def __init__(self, samples: list[Sample]) -> None:
        self._samples = samples
        self.reads = 0

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        self.reads += 1
        s = self._samples[index]
        return Sample(s.tile_id, s.image.copy(), s.mask.copy())


def metrics(result: object) -> tuple[float, float, float, float]:
    return (result.train_loss, result.train_iou, result.val_loss, result.val_iou)  # type: ignore[attr-defined]


def test_loading_in_worker_processes_gives_the_same_run(discs: DiscFactory) -> None:
    data = discs(10, 48, seed=1), discs(4, 48, seed=2)
    config = dict(epochs=2, seed=3, augment=True, crop_size=32, num_threads=1)
    in_process = train(cpu_config(**config), *data).history
    by_workers = train(cpu_config(**config, data_workers=2), *data).history
    assert [metrics(r) for r in in_process] == [metrics(r) for r in by_workers]


def test_a_source_is_read_tile_by_tile_and_kept_only_within_the_cache_budget(discs: DiscFactory) -> None:
    # 9 tiles of 32² prepared hold 9 * 1024 * 20 bytes = 0.18 MB: they fit 1 MB, not 0 MB.
    for cache_mb, epochs_read in ((0, 3), (1, 1)):
        train_source, val_source = CountingSource(discs(6, 32, seed=1)), CountingSource(discs(3, 32, seed=2))
        config = cpu_config(epochs=3, seed=0, normalization="dataset", prepared_cache_mb=cache_mb)
        history = train(config, train_source, val_source).history
        # One checking pass, then each tile once per epoch (no cache) or once in all (it fits).
        assert train_source.reads == 6 * (1 + epochs_read) and val_source.reads == 3 * (1 + epochs_read)
        if cache_mb == 0:
            streamed = history
    assert [metrics(r) for r in history] == [metrics(r) for r in streamed]  # the cache changes nothing else


def test_a_bad_tile_fails_before_training_naming_it(discs: DiscFactory) -> None:
    samples = discs(6, 32, seed=1)
    samples[4] = Sample("broken", samples[4].image, np.full((32, 32), 7, np.int64))
    with pytest.raises(InvalidTileError, match="broken"):
        scan(samples, num_classes=2, ignore_index=IGNORE_INDEX, field="train_samples")
    source = CountingSource(samples)
    with pytest.raises(InvalidTileError, match="broken"):
        train(cpu_config(epochs=1), source, discs(2, 32, seed=2))
    assert source.reads <= len(samples)  # it stopped in the checking pass, before any training


def test_scan_counts_class_pixels_and_computes_the_normalization_in_one_pass(discs: DiscFactory) -> None:
    samples = discs(5, 32, seed=4)
    found = scan(CountingSource(samples), num_classes=2, ignore_index=IGNORE_INDEX, field="s", mode="dataset")
    expected = np.bincount(np.concatenate([s.mask.ravel() for s in samples]), minlength=2)
    assert found.class_pixels.tolist() == expected.tolist()
    assert found.normalization is not None and found.normalization.mode == "dataset"


def test_a_set_too_large_for_the_cache_keeps_none_of_it() -> None:
    from segcore.tiles import prepared_cache_budget

    # Prepared tiles stay in their native type: a 16-bit tile of 64² holds 6 + 1 bytes a pixel.
    tiles = [Sample(f"t{i}", np.full((64, 64, 3), 300 * i, np.uint16), np.zeros((64, 64), np.uint8))
             for i in range(4)]
    found = scan(tiles, num_classes=2, ignore_index=IGNORE_INDEX, field="samples")
    assert found.prepared_bytes == 4 * 64 * 64 * 7
    assert prepared_cache_budget(found.prepared_bytes, 2**20) == 2**20
    assert prepared_cache_budget(found.prepared_bytes, found.prepared_bytes - 1) == 0


@pytest.mark.parametrize("mode", ["percentile", "dataset", "imagenet"])
def test_tiles_prepared_from_the_checking_pass_measures_equal_tiles_measured_again(mode: str) -> None:
    from segcore.tiles import PreparedTiles, TileRequest

    rng = np.random.default_rng(4)
    tiles = [Sample(f"t{i}", np.repeat(rng.integers(100 * i, 900 + 100 * i, (40, 52, 1)).astype(np.uint16), 3, axis=2),
                    rng.integers(0, 2, (40, 52)).astype(np.uint8)) for i in range(5)]
    found = scan(tiles, num_classes=2, ignore_index=IGNORE_INDEX, field="samples", mode=mode)
    assert found.measures is not None and found.measures.shape == (5, 13)
    norm = found.normalization
    assert norm is not None
    measured_once = PreparedTiles(tiles, norm, 2, IGNORE_INDEX, found.measures)
    measured_again = PreparedTiles(tiles, norm, 2, IGNORE_INDEX)
    for i in range(5):
        for request in (TileRequest(i), TileRequest(i, 24, 7 + i)):
            a, b = measured_once[request], measured_again[request]
            assert np.array_equal(a.image, b.image)
            for x, y in zip((*a.pixels(), a.mean, a.std), (*b.pixels(), b.mean, b.std), strict=True):
                assert torch.equal(x, y)


def known_of(samples: list[Sample], num_classes: int, low: float = 1.0, high: float = 99.8) -> KnownMeasures:
    """What a set's preparation records of these tiles (services/pipeline_svc: set_preparation)."""
    rows: dict[ScalingKey, list[np.ndarray]] = {}
    for s in samples:
        for key, measured in measure_scalings(s.image, low, high).items():
            rows.setdefault(key, []).append(measured.row())
    pixels = np.stack([np.bincount(s.mask.ravel(), minlength=num_classes) for s in samples])
    return KnownMeasures(class_pixels=pixels, decoded_bytes=sum(s.image.nbytes + s.mask.nbytes for s in samples),
                         rows={key: np.stack(r) for key, r in rows.items()})


def sixteen_bit(count: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample(f"t{i}", np.repeat(rng.integers(100 * i, 900 + 100 * i, (40, 52, 1)).astype(np.uint16), 3, axis=2),
                   rng.integers(0, 2, (40, 52)).astype(np.uint8)) for i in range(count)]


@pytest.mark.parametrize("mode", ["percentile", "dataset", "imagenet"])
def test_measures_known_from_the_sets_preparation_are_the_checking_pass_without_reading_a_tile(mode: str) -> None:
    tiles = sixteen_bit(6, seed=5)
    read = scan(tiles, num_classes=2, ignore_index=IGNORE_INDEX, field="s", mode=mode)
    source = CountingSource(tiles)
    known = scan(source, num_classes=2, ignore_index=IGNORE_INDEX, field="s", mode=mode, known=known_of(tiles, 2))
    assert source.reads == 0
    assert known.normalization == read.normalization
    assert known.measures is not None and read.measures is not None
    assert np.array_equal(known.measures, read.measures)
    assert torch.equal(known.class_pixels, read.class_pixels) and known.prepared_bytes == read.prepared_bytes


def test_measures_taken_with_other_percentiles_are_not_used() -> None:
    tiles = sixteen_bit(4, seed=6)
    source = CountingSource(tiles)
    found = scan(source, num_classes=2, ignore_index=IGNORE_INDEX, field="s", mode="percentile",
                 percentile_low=2.0, known=known_of(tiles, 2))
    assert source.reads == 4  # read and measured as asked
    assert found.normalization is not None and found.normalization.percentile_low == 2.0


def test_a_run_on_known_measures_reads_each_tile_only_for_its_batches_and_trains_the_same(discs: DiscFactory) -> None:
    train_tiles, val_tiles = discs(6, 32, seed=1), discs(3, 32, seed=2)
    config = dict(epochs=2, seed=0, normalization="percentile", prepared_cache_mb=0, num_threads=1)
    checked = train(cpu_config(**config), CountingSource(train_tiles), CountingSource(val_tiles)).history
    train_source, val_source = CountingSource(train_tiles), CountingSource(val_tiles)
    known = train(cpu_config(**config), train_source, val_source,
                  known=(known_of(train_tiles, 2), known_of(val_tiles, 2))).history
    assert (train_source.reads, val_source.reads) == (6 * 2, 3 * 2)  # no checking pass: once per epoch
    assert [metrics(r) for r in known] == [metrics(r) for r in checked]
