"""Unit tests for segcore.regimes: dtypes, value ranges, learnability, determinism, I/O.

Files are read back with Pillow / tifffile directly (not segcore.imaging), so
these tests pin the on-disk encoding itself.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segcore import synthetic
from segcore.regimes import (
    REGIMES,
    RegimeTile,
    class_names,
    encode_image,
    generate_regime,
    tile_suffix,
    write_regime_set,
)

FLUORESCENCE = ("fluorescence-16bit", "fluorescence-12bit", "float-offset")
# regime -> (dtype, channels or None for H x W)
LAYOUT: dict[str, tuple[type[np.generic], int | None]] = {
    "brightfield-8bit": (np.uint8, 3),
    "fluorescence-16bit": (np.uint16, None),
    "fluorescence-12bit": (np.uint16, None),
    "float-offset": (np.float32, None),
    "he-rgb": (np.uint8, 3),
}


@pytest.fixture(scope="module")
def tile_sets() -> dict[str, list[RegimeTile]]:
    return {regime: generate_regime(regime, 32, seed=7) for regime in REGIMES}


def _noise_sigma(tile: RegimeTile) -> float:
    """Pixel noise from horizontal neighbour differences inside the background."""
    image = tile.image.astype(np.float64)
    both_bg = (tile.mask[:, 1:] == 0) & (tile.mask[:, :-1] == 0)
    return float(np.diff(image, axis=1)[both_bg].std() / np.sqrt(2.0))


def _background_medians(tiles: list[RegimeTile]) -> list[float]:
    """Median background level (mean over channels) of each source image."""
    per_source: dict[str, list[np.ndarray]] = defaultdict(list)
    for t in tiles:
        per_source[t.source_image].append(t.image[t.mask == 0].astype(np.float64))
    return [float(np.median(np.concatenate(v), axis=0).mean()) for v in per_source.values()]


def test_regime_list_and_class_names() -> None:
    assert REGIMES == ("brightfield-8bit", "fluorescence-16bit", "fluorescence-12bit", "float-offset", "he-rgb")
    assert class_names("brightfield-8bit") == synthetic.CLASS_NAMES
    for regime in REGIMES:
        assert class_names(regime)[0] == "background"
        if regime != "brightfield-8bit":
            assert class_names(regime) == ["background", "nucleus"]
    # A copy: callers may not mutate the module's list.
    class_names("he-rgb").append("x")
    assert class_names("he-rgb") == ["background", "nucleus"]


@pytest.mark.parametrize("call", [class_names, tile_suffix, lambda r: generate_regime(r, 1)])
def test_unknown_regime_raises_naming_valid_ones(call: object) -> None:
    with pytest.raises(ValueError, match="fluorescence-16bit"):
        call("confocal-24bit")  # type: ignore[operator]


def test_invalid_sizes_raise() -> None:
    assert generate_regime("he-rgb", 0) == []
    with pytest.raises(ValueError):
        generate_regime("he-rgb", -1)
    with pytest.raises(ValueError):
        generate_regime("fluorescence-16bit", 1, tile_size=8)
    with pytest.raises(ValueError):
        generate_regime("float-offset", 1, tiles_per_image=0)


@pytest.mark.parametrize("regime", REGIMES)
def test_dtype_shape_and_mask_values(regime: str, tile_sets: dict[str, list[RegimeTile]]) -> None:
    dtype, channels = LAYOUT[regime]
    tiles = tile_sets[regime]
    assert len(tiles) == 32
    for t in tiles:
        assert t.image.dtype == dtype
        assert t.image.shape == ((128, 128) if channels is None else (128, 128, channels))
        assert t.mask.dtype == np.uint8 and t.mask.shape == (128, 128)
        assert int(t.mask.max()) < len(class_names(regime))
        assert t.name.startswith(t.source_image + "_")
    assert len({t.name for t in tiles}) == len(tiles)


@pytest.mark.parametrize("regime", ["fluorescence-16bit", "he-rgb"])
def test_other_tile_sizes(regime: str) -> None:
    tiles = generate_regime(regime, 3, tile_size=64, seed=1, tiles_per_image=3)
    assert [t.source_image for t in tiles] == ["img00"] * 3
    assert all(t.image.shape[:2] == (64, 64) for t in tiles)


@pytest.mark.parametrize("regime", REGIMES)
def test_deterministic_and_prefix(regime: str) -> None:
    a = generate_regime(regime, 6, seed=3, tiles_per_image=4)
    b = generate_regime(regime, 6, seed=3, tiles_per_image=4)
    small = generate_regime(regime, 3, seed=3, tiles_per_image=4)
    assert [t.name for t in a] == [t.name for t in b]
    for ta, tb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta.image, tb.image)
        np.testing.assert_array_equal(ta.mask, tb.mask)
    for ts, ta in zip(small, a[:3], strict=True):
        assert ts.name == ta.name
        np.testing.assert_array_equal(ts.image, ta.image)
        np.testing.assert_array_equal(ts.mask, ta.mask)
    other = generate_regime(regime, 1, seed=4)
    assert not np.array_equal(other[0].image, a[0].image)


def test_fluorescence_regimes_share_scenes(tile_sets: dict[str, list[RegimeTile]]) -> None:
    # Same seed -> same nuclei; only the camera encoding differs.
    for a, b in zip(tile_sets["fluorescence-16bit"], tile_sets["float-offset"], strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)


def test_16bit_signal_fills_under_one_percent_of_range(tile_sets: dict[str, list[RegimeTile]]) -> None:
    images = np.stack([t.image for t in tile_sets["fluorescence-16bit"]])
    assert int(images.max()) < 655  # < 1 % of 65535
    assert int(images.max()) > 250  # but there is a real signal above the ~100 offset
    background = images[np.stack([t.mask for t in tile_sets["fluorescence-16bit"]]) == 0]
    assert 95 <= float(np.median(background)) <= 140


def test_12bit_range(tile_sets: dict[str, list[RegimeTile]]) -> None:
    images = np.stack([t.image for t in tile_sets["fluorescence-12bit"]])
    assert int(images.max()) <= 4095
    assert int(images.max()) > 1000


def test_float_offset_far_outside_unit_range(tile_sets: dict[str, list[RegimeTile]]) -> None:
    images = np.stack([t.image for t in tile_sets["float-offset"]])
    assert np.isfinite(images).all()
    assert float(images.min()) > 9000.0
    assert float(images.max()) < 2.0e4
    assert float(images.max() - images.min()) > 500.0  # a real signal on top of the offset


@pytest.mark.parametrize("regime", FLUORESCENCE)
def test_fluorescence_nuclei_brighter_by_several_sigmas(regime: str, tile_sets: dict[str, list[RegimeTile]]) -> None:
    tiles = tile_sets[regime]
    sigma = float(np.median([_noise_sigma(t) for t in tiles]))
    images = np.stack([t.image for t in tiles]).astype(np.float64)
    masks = np.stack([t.mask for t in tiles])
    assert sigma > 0
    assert images[masks == 1].mean() - images[masks == 0].mean() > 5 * sigma
    for t in tiles:  # also within every tile that shows a nucleus
        if (t.mask == 1).sum() > 50:
            fg, bg = t.image[t.mask == 1].astype(np.float64), t.image[t.mask == 0].astype(np.float64)
            assert fg.mean() - bg.mean() > 3 * _noise_sigma(t), t.name


def test_he_nuclei_distinct_from_stroma(tile_sets: dict[str, list[RegimeTile]]) -> None:
    images = np.stack([t.image for t in tile_sets["he-rgb"]]).astype(np.float64)
    masks = np.stack([t.mask for t in tile_sets["he-rgb"]])
    background, nucleus = images[masks == 0].mean(axis=0), images[masks == 1].mean(axis=0)
    assert np.linalg.norm(background - nucleus) > 40
    # Hematoxylin absorbs red: nuclei are bluish (B > R); eosin leaves stroma pink (R > G).
    assert nucleus[2] > nucleus[0] and background[0] > background[1] + 20
    # Stroma is textured, not flat.
    assert images[masks == 0].std(axis=0).min() > 5


@pytest.mark.parametrize("regime", REGIMES)
def test_foreground_fraction(regime: str, tile_sets: dict[str, list[RegimeTile]]) -> None:
    fractions = np.array([(t.mask > 0).mean() for t in tile_sets[regime]])
    assert 0.05 <= fractions.mean() <= 0.35, fractions.mean()
    assert np.median(fractions) >= 0.04 and fractions.max() <= 0.5


@pytest.mark.parametrize(
    ("regime", "min_spread"),
    [
        ("brightfield-8bit", 2.0),
        ("fluorescence-16bit", 5.0),
        ("fluorescence-12bit", 40.0),
        ("float-offset", 12.0),
        ("he-rgb", 2.0),
    ],
)
def test_source_images_differ_in_style(regime: str, min_spread: float, tile_sets: dict[str, list[RegimeTile]]) -> None:
    medians = _background_medians(tile_sets[regime])
    assert len(medians) == 8
    assert max(medians) - min(medians) > min_spread, medians


def test_suffixes() -> None:
    assert {r: tile_suffix(r) for r in REGIMES} == {
        "brightfield-8bit": ".png",
        "fluorescence-16bit": ".png",
        "fluorescence-12bit": ".png",
        "float-offset": ".tif",
        "he-rgb": ".png",
    }


@pytest.mark.parametrize(
    ("array", "magic"),
    [
        (np.zeros((5, 7), np.uint8), b"\x89PNG"),
        (np.zeros((5, 7, 3), np.uint8), b"\x89PNG"),
        (np.full((5, 7), 600, np.uint16), b"\x89PNG"),
        (np.zeros((5, 7, 3), np.uint16), b"II*\x00"),
        (np.zeros((5, 7), np.float32), b"II*\x00"),
        (np.zeros((5, 7), np.int32), b"II*\x00"),
    ],
)
def test_encode_image_format_and_lossless(array: np.ndarray, magic: bytes) -> None:
    array = array.copy()
    array.flat[::3] = 3
    data = encode_image(array)
    assert data[:4] == magic
    if magic == b"\x89PNG":
        with Image.open(io.BytesIO(data)) as img:
            decoded = np.asarray(img)
    else:
        decoded = tifffile.imread(io.BytesIO(data))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("regime", REGIMES)
def test_write_regime_set_roundtrip(regime: str, tmp_path: Path, tile_sets: dict[str, list[RegimeTile]]) -> None:
    tiles = tile_sets[regime][:3]
    tiles_dir, masks_dir = tmp_path / "a" / "tiles", tmp_path / "a" / "masks"
    write_regime_set(tiles, tiles_dir, masks_dir)
    suffix = tile_suffix(regime)
    assert sorted(p.name for p in tiles_dir.iterdir()) == sorted(f"{t.name}{suffix}" for t in tiles)
    for t in tiles:
        path = tiles_dir / f"{t.name}{suffix}"
        if suffix == ".tif":
            decoded = tifffile.imread(path)
        else:
            with Image.open(path) as img:
                decoded = np.asarray(img)
        assert decoded.dtype == t.image.dtype
        np.testing.assert_array_equal(decoded, t.image)
        with Image.open(masks_dir / f"{t.name}.png") as msk:
            assert msk.mode == "L"
            np.testing.assert_array_equal(np.asarray(msk), t.mask)


def test_write_rejects_mismatched_mask(tmp_path: Path) -> None:
    tile = RegimeTile("x_tile00", "x", np.zeros((8, 8), np.uint16), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="x_tile00"):
        write_regime_set([tile], tmp_path / "t", tmp_path / "m")


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    generate_regime("fluorescence-16bit", 64, seed=0)
    # Budget is well under 2 s; keep headroom for slow CI machines.
    assert time.perf_counter() - start < 4.0
