"""Intensity handling for the data users bring: decode/normalize round trips at every bit depth,
the channel mapping, percentile normalization, the choice "auto" makes, and augmentation that
never swamps the signal of a narrow-range 16-bit image."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from segcore import regimes
from segcore.data import Sample, augment, make_batch, prepare_samples
from segcore.errors import InvalidTileError
from segcore.imaging import decode_image
from segcore.inference import normalize
from segcore.intensity import (
    DATASET,
    IMAGENET,
    PERCENTILE,
    Normalization,
    choose_normalization,
    compute_normalization,
    percentile_scale,
    profile_images,
)
from segcore.metrics import IGNORE_INDEX

RNG = np.random.default_rng(3)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff(array: np.ndarray, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


# One scene (a bright disc on a dim background) encoded the ways users' cameras and tools store it.
_YY, _XX = np.mgrid[:48, :48]
_DISC = (_YY - 24) ** 2 + (_XX - 24) ** 2 < 12**2
SCENE = np.where(_DISC, 1.0, 0.0) + RNG.normal(0, 0.05, _DISC.shape)
ENCODINGS = {
    "8-bit": (np.clip(40 + 150 * SCENE, 0, 255).astype(np.uint8), png),
    "12-bit in 16": (np.clip(200 + 3000 * SCENE, 0, 4095).astype(np.uint16), png),
    "16-bit narrow": (np.clip(100 + 300 * SCENE, 0, 65535).astype(np.uint16), png),  # 0.6 % of the range
    "16-bit full": (np.clip(2000 + 60000 * SCENE, 0, 65535).astype(np.uint16), tiff),
    "signed 16-bit": (np.clip(-800 + 900 * SCENE, -32768, 32767).astype(np.int16), tiff),
    "float, offset": ((1.0e4 + 250 * SCENE).astype(np.float32), tiff),
    "float, negative": ((-3.5 + 0.01 * SCENE).astype(np.float32), tiff),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_decode_keeps_values_and_percentile_normalization_makes_encodings_alike(name: str) -> None:
    native, encode = ENCODINGS[name]
    decoded = decode_image(encode(native), f"{name}.tile")
    assert decoded.dtype == native.dtype and decoded.shape == (48, 48, 3)
    np.testing.assert_array_equal(decoded[:, :, 1], native)  # lossless, native units
    norm = compute_normalization([decoded], PERCENTILE)
    pixels = normalize(decoded, norm)
    assert pixels.shape == (3, 48, 48) and torch.isfinite(pixels).all()
    # The disc stands out by the same margin whatever the bit depth, offset or units.
    contrast = float(pixels[0][torch.from_numpy(_DISC)].mean() - pixels[0][torch.from_numpy(~_DISC)].mean())
    reference = _percentile_contrast(SCENE)
    assert contrast == pytest.approx(reference, rel=0.08), name
    back = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back == norm
    torch.testing.assert_close(normalize(decoded, back), pixels)


def _percentile_contrast(scene: np.ndarray) -> float:
    image = np.repeat(scene[:, :, None], 3, axis=2)
    pixels = normalize(image, compute_normalization([image], PERCENTILE))[0].numpy()
    return float(pixels[_DISC].mean() - pixels[~_DISC].mean())


def test_percentile_scale_maps_the_percentiles_per_channel_and_survives_a_constant_channel() -> None:
    image = np.stack([RNG.normal(500, 20, (64, 64)), RNG.normal(3, 0.1, (64, 64)), np.zeros((64, 64))], axis=2)
    out = percentile_scale(image.astype(np.float32), 1.0, 99.0)
    for c in range(2):
        assert np.percentile(out[:, :, c], 1.0) == pytest.approx(0.0, abs=1e-5)
        assert np.percentile(out[:, :, c], 99.0) == pytest.approx(1.0, abs=1e-5)
    assert np.all(out[:, :, 2] == 0.0)


def test_models_saved_before_modes_keep_their_exact_normalization() -> None:
    legacy = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 0.1]}
    norm = Normalization.from_dict(legacy)
    assert norm.mode == DATASET
    image = np.full((2, 3, 3), 153, np.uint8)  # 0.6 of the 8-bit range, as before
    torch.testing.assert_close(normalize(image, norm)[:, 0, 0], torch.tensor([1.0, 1.6, 3.0]))


def test_two_channel_tiff_fills_two_inputs_and_more_than_four_channels_are_refused() -> None:
    two = RNG.integers(0, 4096, (2, 16, 16), dtype=np.uint16)
    image = decode_image(tiff(two, planarconfig="separate", photometric="minisblack"), "two.tif")
    np.testing.assert_array_equal(image[:, :, 0], two[0])
    np.testing.assert_array_equal(image[:, :, 1], two[1])
    assert not image[:, :, 2].any()
    grey_alpha = np.stack([np.full((8, 8), 90, np.uint8), np.full((8, 8), 255, np.uint8)], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(grey_alpha, mode="LA").save(buffer, format="PNG")
    assert (decode_image(buffer.getvalue(), "la.png") == 90).all()  # alpha is not a signal
    with pytest.raises(InvalidTileError, match="5 channels") as info:
        decode_image(tiff(RNG.integers(0, 255, (5, 16, 16), dtype=np.uint8), planarconfig="separate",
                          photometric="minisblack"), "five.tif")
    assert info.value.tile == "five.tif"


def test_nan_in_float_tiles_is_refused_naming_the_tile() -> None:
    bad = np.ones((8, 8), np.float32)
    bad[2, 3] = np.nan
    with pytest.raises(InvalidTileError, match="NaN") as info:
        decode_image(tiff(bad), "nan.tif")
    assert info.value.tile == "nan.tif"


@pytest.mark.parametrize(("images", "pretrained", "parent", "expected"), [
    ([np.zeros((4, 4, 3), np.uint16)], False, None, PERCENTILE),
    ([np.repeat(RNG.integers(0, 255, (4, 4, 1), dtype=np.uint8), 3, axis=2)], False, None, PERCENTILE),
    ([RNG.integers(0, 255, (4, 4, 3), dtype=np.uint8)], False, None, DATASET),
    ([RNG.integers(0, 255, (4, 4, 3), dtype=np.uint8)], True, None, IMAGENET),
    ([RNG.random((4, 4, 3)).astype(np.float32)], False, None, PERCENTILE),
    ([RNG.integers(0, 255, (4, 4, 3), dtype=np.uint8)], False, PERCENTILE, PERCENTILE),
], ids=["16-bit", "8-bit grey", "8-bit rgb", "8-bit rgb pretrained", "float rgb", "parent"])
def test_auto_chooses_from_the_data_and_says_why(images: list[np.ndarray], pretrained: bool, parent: str | None,
                                                 expected: str) -> None:
    mode, reason = choose_normalization("auto", profile_images(images), pretrained=pretrained, parent_mode=parent)
    assert mode == expected
    assert reason.startswith(f"auto chose {expected}")
    assert choose_normalization("dataset", profile_images(images)) == ("dataset", "dataset: asked for")


def test_profile_reports_how_much_of_the_range_a_narrow_16_bit_set_uses() -> None:
    tiles = regimes.generate_regime("fluorescence-16bit", 4, tile_size=64)
    profile = profile_images(np.repeat(t.image[:, :, None], 3, axis=2) for t in tiles)
    assert profile.pixel_types == ("uint16",) and profile.single_channel
    assert profile.max_value < 0.01 * 65535
    assert "% of the uint16 range" in profile.describe()


def test_augmentation_preserves_the_signal_of_a_narrow_range_16_bit_image() -> None:
    tile = regimes.generate_regime("fluorescence-16bit", 1, tile_size=96, seed=5)[0]
    image = np.repeat(tile.image[:, :, None], 3, axis=2)
    fg = torch.from_numpy(tile.mask == 1)
    assert image.max() < 0.01 * 65535 and fg.any()
    for mode in (DATASET, PERCENTILE):
        norm = compute_normalization([image], mode)
        prepared = prepare_samples([Sample("t", image, tile.mask)], norm, 2, IGNORE_INDEX, field="s")[0]
        pixels, labels = prepared.pixels()
        base = pixels[0]
        separation = float(base[fg].mean() - base[~fg].mean())
        spread = float(base.std())
        generator = torch.Generator().manual_seed(0)
        for _ in range(50):
            out, mask = augment(pixels, labels, generator, prepared.mean, prepared.std)
            moved = out[0][mask == 1].mean() - out[0][mask == 0].mean()
            # Gain stays within 10 % and the shift within 0.2 of the image's own standard deviation.
            assert 0.85 * separation <= float(moved) <= 1.15 * separation, mode
            assert abs(float(out[0].mean() - base.mean())) <= 0.21 * spread, mode


def test_training_batches_of_a_narrow_range_set_stay_on_the_signal_scale() -> None:
    tiles = regimes.generate_regime("fluorescence-16bit", 4, tile_size=64, seed=2)
    samples = [Sample(t.name, np.repeat(t.image[:, :, None], 3, axis=2), t.mask) for t in tiles]
    norm = compute_normalization([s.image for s in samples], PERCENTILE)
    prepared = prepare_samples(samples, norm, 2, IGNORE_INDEX, field="s")
    images, _ = make_batch(prepared, [0, 1, 2, 3], generator=torch.Generator().manual_seed(1), crop_size=None,
                           augment_data=True, ignore_index=IGNORE_INDEX)
    # Standardised input: about zero mean and unit spread, not shifted by whole multiples of it.
    assert abs(float(images.mean())) < 0.5 and 0.5 < float(images.std()) < 2.0


# The fast paths (value counts instead of sorting, moments instead of float copies, converting only
# the crop) must give the network exactly what the plain float computation gives.
_NATIVE_IMAGES = {
    "uint8 colour": lambda: RNG.integers(0, 256, (40, 56, 3)).astype(np.uint8),
    "uint16 grey": lambda: np.repeat(RNG.integers(90, 700, (40, 56, 1)).astype(np.uint16), 3, axis=2),
    "int16 two-channel": lambda: np.dstack([RNG.integers(-900, 400, (40, 56)), RNG.integers(5, 60, (40, 56)),
                                            np.zeros((40, 56))]).astype(np.int16),
    "float32 units": lambda: RNG.normal(1e3, 40.0, (40, 56, 3)).astype(np.float32),
}


@pytest.mark.parametrize("kind", sorted(_NATIVE_IMAGES))
def test_percentiles_from_value_counts_equal_numpys(kind: str) -> None:
    image = _NATIVE_IMAGES[kind]()
    fast = percentile_scale(image, 1.0, 99.8)
    reference = percentile_scale(image.astype(np.float64), 1.0, 99.8)  # floats take np.percentile
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [DATASET, PERCENTILE])
@pytest.mark.parametrize("kind", sorted(_NATIVE_IMAGES))
def test_normalization_statistics_and_prepared_crops_equal_the_float_computation(kind: str, mode: str) -> None:
    images = [_NATIVE_IMAGES[kind]() for _ in range(3)]
    norm = compute_normalization(images, mode)
    scaled = np.concatenate([scaled_image(i, norm).reshape(-1, 3) for i in images]).astype(np.float64)
    np.testing.assert_allclose(norm.mean, scaled.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(norm.std, np.maximum(scaled.std(axis=0), 1e-6), rtol=1e-5, atol=1e-7)

    mask = RNG.integers(0, 2, images[0].shape[:2]).astype(np.uint8)
    prepared = prepare_samples([Sample("t", images[0], mask)], norm, 2, IGNORE_INDEX, field="s")[0]
    assert prepared.image.dtype == images[0].dtype  # kept native until a batch uses it
    whole = normalize(images[0], norm)
    np.testing.assert_allclose(prepared.pixels()[0], whole, rtol=1e-5, atol=1e-5)
    crop, crop_mask = prepared.pixels(7, 11, 24)
    np.testing.assert_allclose(crop, whole[:, 7:31, 11:35], rtol=1e-5, atol=1e-5)
    assert torch.equal(crop_mask, torch.from_numpy(mask[7:31, 11:35].astype(np.int64)))
    np.testing.assert_allclose(prepared.mean.flatten(), whole.double().mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prepared.std.flatten(), whole.double().std(dim=(1, 2)), rtol=1e-5, atol=1e-5)


def scaled_image(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """The per-image scaling computed the plain way, in float64."""
    pixels = image.astype(np.float64)
    if norm.mode != PERCENTILE:
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            return (pixels - min(info.min, 0)) / (info.max - min(info.min, 0))
        return pixels
    if not pixels[:, :, 2].any() and not np.array_equal(pixels[:, :, 0], pixels[:, :, 1]):
        out = np.zeros_like(pixels)
        for c in range(2):
            lo, hi = np.percentile(pixels[:, :, c], [norm.percentile_low, norm.percentile_high])
            out[:, :, c] = (pixels[:, :, c] - lo) / (hi - lo)
        return out
    grey = np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 0], pixels[:, :, 2])
    lo, hi = np.percentile(pixels[:, :, 0] if grey else pixels, [norm.percentile_low, norm.percentile_high])
    return (pixels - lo) / (hi - lo)
