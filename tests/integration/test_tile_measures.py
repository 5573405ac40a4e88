"""A set's preparation measures every tile once, so that no training job reads its tiles before
the first batch: the measures travel from the pipeline service's tile rows through the attempt's
tile manifest to the trainer, and give exactly what the trainer's own checking pass would."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2

from clients.sdk import Client
from segcore import regimes
from segcore.metrics import IGNORE_INDEX
from segcore.tiles import scan
from services.common.storage import ObjectStore
from services.trainer_svc.tile_source import PatientStore, StoredTiles, known_measures
from tests.integration.fake_node import RefusingNode

REGIME = "fluorescence-16bit"


@pytest.fixture
def fluorescence(client: Client, tmp_path: Path) -> pb.TrainingSet:
    tiles = regimes.generate_regime(REGIME, 10, tile_size=64, seed=3)
    regimes.write_regime_set(tiles, tmp_path / "f" / "tiles", tmp_path / "f" / "masks")
    return client.create_training_set("nuclei", tmp_path / "f" / "tiles", tmp_path / "f" / "masks",
                                      class_names=regimes.class_names(REGIME), group_by=r"^(.*)_tile")


def run_job_request(node: RefusingNode, job: str, timeout: float = 20) -> trainer_pb2.RunJobRequest:
    """The RunJob the node got for `job` (the job is ASSIGNED before the call reaches the node)."""
    deadline = time.monotonic() + timeout
    while job not in node.requests:
        assert time.monotonic() < deadline, f"{job} never reached the node"
        time.sleep(0.05)
    return node.requests[job]


class CountingTiles(StoredTiles):
    def __init__(self, tiles: list[trainer_pb2.TrainingTile], store: PatientStore) -> None:
        super().__init__(tiles, store)
        self.reads = 0

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("normalization", ["percentile", "dataset"])
def test_the_attempts_manifest_carries_each_tiles_measures_equal_to_a_checking_pass_over_the_stored_tiles(
        client: Client, node: RefusingNode, fluorescence: pb.TrainingSet, store: ObjectStore,
        normalization: str) -> None:
    job = client.create_job(pipeline="segmentation", training_set=fluorescence.name,
                            hyperparameters=common_pb2.Hyperparameters(normalization=normalization))
    client.start_job(job.name)
    request = run_job_request(node, job.name)
    manifest = trainer_pb2.TileManifest.FromString(store.get(request.tile_manifest.uri))
    classes = len(fluorescence.class_names)
    patient = PatientStore(store, patience_s=5)
    for validation in (False, True):
        split = [t for t in manifest.tiles if t.validation == validation]
        known = known_measures(split, classes)
        assert known is not None, "every tile of a newly prepared set is measured"
        tiles = CountingTiles(split, patient)
        told = scan(tiles, num_classes=classes, ignore_index=IGNORE_INDEX, field="s", mode=normalization, known=known)
        assert tiles.reads == 0
        read = scan(tiles, num_classes=classes, ignore_index=IGNORE_INDEX, field="s", mode=normalization)
        assert tiles.reads == len(split)
        assert told.normalization == read.normalization
        assert told.measures is not None and read.measures is not None
        assert np.array_equal(told.measures, read.measures)
        assert torch.equal(told.class_pixels, read.class_pixels) and told.prepared_bytes == read.prepared_bytes


def test_tiles_without_measures_are_read_again() -> None:
    measured = trainer_pb2.TrainingTile(name="a", measures=trainer_pb2.TileMeasures(decoded_bytes=1))
    assert known_measures([measured, trainer_pb2.TrainingTile(name="b")], 2) is None
    assert known_measures([], 2) is None


def test_a_job_fetches_a_set_that_fits_the_disk_cache_once_before_training(
        client: Client, node: RefusingNode, fluorescence: pb.TrainingSet, store: ObjectStore, tmp_path: Path) -> None:
    from services.trainer_svc.tile_source import DiskCache

    job = client.create_job(pipeline="segmentation", training_set=fluorescence.name)
    client.start_job(job.name)
    manifest = store.get(run_job_request(node, job.name).tile_manifest.uri)
    tiles = list(trainer_pb2.TileManifest.FromString(manifest).tiles)
    stored = sum(len(store.get(k)) for t in tiles for k in (t.image_uri, t.mask_uri))
    assert sum(t.measures.stored_bytes for t in tiles) == stored  # what the node compares with its cache
    cache = DiskCache(tmp_path / "cache", 2**30)
    patient = PatientStore(store, patience_s=5, cache=cache)
    assert patient.warm(tiles, threads=4, stop=lambda: True) == 0  # a cancelled job fetches nothing more
    assert patient.warm(tiles, threads=4) == 2 * len(tiles)
    assert all(cache.holds(k) for t in tiles for k in (t.image_uri, t.mask_uri))
    assert patient.warm(tiles, threads=4) == 0  # held already: nothing fetched again
    assert cache.get(tiles[0].image_uri) == store.get(tiles[0].image_uri)
