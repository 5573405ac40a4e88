"""Unit tests for segcore.synthetic: determinism, shapes, class balance, I/O."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore.synthetic import CLASS_NAMES, SyntheticTile, generate_tiles, write_tile_set


@pytest.fixture(scope="module")
def tiles64() -> list[SyntheticTile]:
    return generate_tiles(64, seed=7)


def test_class_names_contract() -> None:
    assert CLASS_NAMES[0] == "background"
    assert len(CLASS_NAMES) == 3


def test_deterministic_for_seed() -> None:
    a = generate_tiles(6, seed=3)
    b = generate_tiles(6, seed=3)
    assert [t.name for t in a] == [t.name for t in b]
    for ta, tb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta.image, tb.image)
        np.testing.assert_array_equal(ta.mask, tb.mask)


def test_different_seeds_differ() -> None:
    a = generate_tiles(2, seed=1)
    b = generate_tiles(2, seed=2)
    assert not np.array_equal(a[0].image, b[0].image)


def test_smaller_count_is_prefix() -> None:
    # Each source image has its own random stream, so count does not shift images.
    small = generate_tiles(5, seed=11)
    large = generate_tiles(12, seed=11)
    for ts, tl in zip(small, large[: len(small)], strict=True):
        assert ts.name == tl.name
        np.testing.assert_array_equal(ts.image, tl.image)


@pytest.mark.parametrize("tile_size", [64, 128, 96])
def test_shapes_and_dtypes(tile_size: int) -> None:
    tiles = generate_tiles(5, tile_size=tile_size, seed=0, tiles_per_image=3)
    assert len(tiles) == 5
    for t in tiles:
        assert t.image.shape == (tile_size, tile_size, 3)
        assert t.image.dtype == np.uint8
        assert t.mask.shape == (tile_size, tile_size)
        assert t.mask.dtype == np.uint8
        assert int(t.mask.max()) < len(CLASS_NAMES)


def test_zero_count_and_invalid_args() -> None:
    assert generate_tiles(0) == []
    with pytest.raises(ValueError):
        generate_tiles(-1)
    with pytest.raises(ValueError):
        generate_tiles(1, tiles_per_image=0)
    with pytest.raises(ValueError):
        generate_tiles(1, tile_size=4)


def test_class_pixel_fractions(tiles64: list[SyntheticTile]) -> None:
    masks = np.stack([t.mask for t in tiles64])
    fractions = [float((masks == c).mean()) for c in range(len(CLASS_NAMES))]
    assert fractions[0] > 0.5, fractions
    assert fractions[1] >= 0.02, fractions
    assert fractions[2] >= 0.02, fractions


def test_object_counts_vary(tiles64: list[SyntheticTile]) -> None:
    object_px = sorted(int((t.mask > 0).sum()) for t in tiles64)
    # Not every tile is equally crowded: spread between sparse and dense tiles.
    assert object_px[-1] > 3 * max(object_px[0], 1)


def test_classes_are_visually_distinct(tiles64: list[SyntheticTile]) -> None:
    # Guard learnability: mean colours of the classes must stay well apart.
    images = np.stack([t.image for t in tiles64]).astype(np.float64)
    masks = np.stack([t.mask for t in tiles64])
    means = [images[masks == c].mean(axis=0) for c in range(len(CLASS_NAMES))]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.linalg.norm(means[i] - means[j]) > 30, (i, j, means)
    # Background is brighter than both object classes (stained objects absorb light).
    assert means[0].mean() > means[1].mean() and means[0].mean() > means[2].mean()


def test_images_are_textured_not_flat(tiles64: list[SyntheticTile]) -> None:
    t = tiles64[0]
    background = t.image[t.mask == 0].astype(np.float64)
    assert background.std(axis=0).min() > 1.5  # noise + illumination + texture


def test_source_image_grouping() -> None:
    tiles = generate_tiles(10, seed=0, tiles_per_image=4)
    groups = Counter(t.source_image for t in tiles)
    assert list(groups.values()) == [4, 4, 2]
    assert len({t.name for t in tiles}) == len(tiles)
    for t in tiles:
        assert t.name.startswith(t.source_image + "_")


def test_tiles_of_one_source_share_style() -> None:
    # Background colour within a source image should be closer than across images.
    tiles = generate_tiles(24, seed=5, tiles_per_image=4)
    bg: dict[str, list[np.ndarray]] = {}
    for t in tiles:
        bg.setdefault(t.source_image, []).append(np.median(t.image[t.mask == 0], axis=0))
    within = np.mean([np.std(np.stack(v), axis=0).mean() for v in bg.values()])
    across = np.std(np.stack([np.mean(v, axis=0) for v in bg.values()]), axis=0).mean()
    assert within < across * 1.5 + 1.0


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    generate_tiles(100, tile_size=128, seed=0)
    # Budget is 2 s; keep headroom for slow CI machines.
    assert time.perf_counter() - start < 4.0


def test_write_tile_set_roundtrip(tmp_path: Path) -> None:
    tiles = generate_tiles(3, seed=4)
    tiles_dir, masks_dir = tmp_path / "tiles", tmp_path / "masks"
    write_tile_set(tiles, tiles_dir, masks_dir)
    assert sorted(p.name for p in tiles_dir.iterdir()) == sorted(f"{t.name}.png" for t in tiles)
    for t in tiles:
        with Image.open(tiles_dir / f"{t.name}.png") as img:
            assert img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(img), t.image)
        with Image.open(masks_dir / f"{t.name}.png") as msk:
            assert msk.mode == "L"
            np.testing.assert_array_equal(np.asarray(msk), t.mask)
