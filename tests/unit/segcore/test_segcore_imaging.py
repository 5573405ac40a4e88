"""Decoding of tiles and masks in every supported layout, normalisation, mask encoding."""

from __future__ import annotations

import io
import json
import tracemalloc
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from segcore.errors import InvalidTileError, TileTooLargeError
from segcore.imaging import (
    Normalization,
    compute_normalization,
    decode_image,
    decode_mask,
    encode_mask_png,
    image_size,
)
from segcore.inference import normalize
from tests.helpers import decompression_bomb

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
RGBA8 = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
FLOAT_RGB = (RGB8 * 40.5 - 3000).astype(np.float32)  # arbitrary units with an offset


def pil_bytes(array: np.ndarray, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


@pytest.mark.parametrize(
    "data, expected",
    [
        (pil_bytes(GRAY8, "PNG"), as_rgb(GRAY8)),
        (pil_bytes(RGB8, "PNG"), RGB8),
        (pil_bytes(RGBA8, "PNG"), RGBA8[:, :, :3]),
        (pil_bytes(GRAY16, "PNG"), as_rgb(GRAY16)),
        (tiff_bytes(GRAY8), as_rgb(GRAY8)),
        (tiff_bytes(RGB8), RGB8),
        (tiff_bytes(RGBA8, photometric="rgb", extrasamples=["unassalpha"]), RGBA8[:, :, :3]),
        (tiff_bytes(GRAY16), as_rgb(GRAY16)),
        (tiff_bytes(RGB16), RGB16),
        (tiff_bytes(RGB8.transpose(2, 0, 1), photometric="rgb", planarconfig="separate"), RGB8),
        (tiff_bytes(FLOAT_RGB, photometric="rgb"), FLOAT_RGB),
    ],
    ids=[
        "png-gray8", "png-rgb8", "png-rgba8", "png-gray16", "tiff-gray8", "tiff-rgb8",
        "tiff-rgba8", "tiff-gray16", "tiff-rgb16", "tiff-planar", "tiff-float-any-units",
    ],
)  # fmt: skip
def test_decode_image_keeps_native_type_and_range(data: bytes, expected: np.ndarray) -> None:
    image = decode_image(data, "tile.any")
    assert image.dtype == expected.dtype
    assert image.shape == (9, 11, 3)
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("array", [GRAY8, RGB8], ids=["gray", "rgb"])
def test_decode_image_jpeg(array: np.ndarray) -> None:
    smooth = np.full_like(array, 200)  # flat content survives JPEG almost exactly
    image = decode_image(pil_bytes(smooth, "JPEG", quality=95), "tile.jpg")
    assert image.shape == (9, 11, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image, 200, atol=3)


def test_tiff_detected_by_magic_bytes_not_name() -> None:
    image = decode_image(tiff_bytes(GRAY16), "no-extension")
    np.testing.assert_array_equal(image[:, :, 0], GRAY16)


def test_16_bit_and_8_bit_share_a_scale_under_dataset_normalization() -> None:
    white8 = decode_image(pil_bytes(np.full((4, 4), 255, np.uint8), "PNG"), "a.png")
    white16 = decode_image(pil_bytes(np.full((4, 4), 65535, np.uint16), "PNG"), "b.png")
    norm = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert float(normalize(white8, norm).max()) == float(normalize(white16, norm).max()) == 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        pil_bytes(RGB8, "PNG")[:60],  # truncated inside the pixel data
        pil_bytes(RGB8, "JPEG")[:200],
        tiff_bytes(RGB8)[:50],
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    ],
    ids=["empty", "garbage", "png-truncated", "jpeg-truncated", "tiff-truncated", "png-bad-header"],
)
def test_corrupt_bytes_name_the_tile(data: bytes) -> None:
    with pytest.raises(InvalidTileError) as info:
        decode_image(data, "broken_tile_17.png")
    assert info.value.tile == "broken_tile_17.png"
    assert "broken_tile_17.png" in str(info.value)
    with pytest.raises(InvalidTileError) as mask_info:
        decode_mask(data, "broken_mask_17.png")
    assert mask_info.value.tile == "broken_mask_17.png"


MASK = RNG.integers(0, 4, (9, 11)).astype(np.uint8)


@pytest.mark.parametrize(
    "data, expected",
    [
        (pil_bytes(MASK, "PNG"), MASK),
        (pil_bytes((MASK.astype(np.uint16) * 300), "PNG"), MASK.astype(np.int64) * 300),
        (tiff_bytes(MASK), MASK),
        (tiff_bytes(MASK.astype(np.uint16) * 1000), MASK.astype(np.int64) * 1000),
        (pil_bytes(as_rgb(MASK), "PNG"), MASK),
        (tiff_bytes(MASK[:, :, None]), MASK),
    ],
    ids=["png8", "png16", "tiff8", "tiff16", "png-rgb-equal", "tiff-hw1"],
)
def test_decode_mask(data: bytes, expected: np.ndarray) -> None:
    mask = decode_mask(data, "mask.png")
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, expected)


def test_decode_palette_mask_returns_indices_not_colours() -> None:
    img = Image.fromarray(MASK, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_mask(buffer.getvalue(), "p.png"), MASK)


def test_colour_mask_is_refused() -> None:
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(InvalidTileError, match="colour channels") as info:
        decode_mask(pil_bytes(colour, "PNG"), "colour.png")
    assert info.value.tile == "colour.png"


@pytest.mark.parametrize("max_class", [3, 255, 256, 4000])
def test_encode_mask_png_round_trip(max_class: int) -> None:
    mask = np.zeros((5, 6), np.int64)
    mask[1, 2], mask[4, 5] = max_class, 1
    data = encode_mask_png(mask)
    assert Image.open(io.BytesIO(data)).mode == ("L" if max_class < 256 else "I;16")
    np.testing.assert_array_equal(decode_mask(data, "m.png"), mask)


def test_compute_normalization_matches_numpy() -> None:
    images = [RNG.random((6, 7, 3), dtype=np.float32) for _ in range(3)] + [
        RNG.random((4, 4, 3), dtype=np.float32)
    ]
    norm = compute_normalization(images)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    np.testing.assert_allclose(norm.mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(norm.std, pixels.std(axis=0), rtol=1e-6)


def test_constant_channel_does_not_divide_by_zero() -> None:
    norm = compute_normalization([np.full((4, 4, 3), 0.5, np.float32)])
    assert all(s > 0 for s in norm.std)
    assert torch.isfinite(normalize(np.full((4, 4, 3), 0.5, np.float32), norm)).all()


def test_normalization_json_round_trip_and_normalize() -> None:
    norm = Normalization(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    assert Normalization.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    image = np.stack([np.full((2, 3), v, np.float32) for v in (0.6, 0.7, 0.8)], axis=2)
    tensor = normalize(image, norm)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 2.0, 5.0]))




@pytest.mark.parametrize("data", [decompression_bomb("PNG"), decompression_bomb("TIFF", compression="tiff_deflate")],
                         ids=["png", "tiff"])
@pytest.mark.parametrize("decode", [decode_image, decode_mask])
def test_a_decompression_bomb_is_refused_from_its_header(data: bytes, decode: Any) -> None:
    assert len(data) < 200_000  # the reproduced bomb: a few KB that decoded into 5.5 GB
    tracemalloc.start()
    try:
        with pytest.raises(TileTooLargeError, match="12000x12000 is larger than 256x256") as info:
            decode(data, "bomb", max_side=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.tile == "bomb"
    assert peak < 20 * 2**20, f"refusing it took {peak / 2**20:.0f} MiB"
    with pytest.raises(TileTooLargeError, match="larger than 8192x8192"):  # over the absolute limit too
        decode(decompression_bomb("PNG", side=9_000), "bomb")


def test_image_size_reads_only_the_header() -> None:
    assert image_size(decompression_bomb("PNG", side=9_000), "t") == (9_000, 9_000)
    planar = io.BytesIO()
    tifffile.imwrite(planar, np.zeros((3, 20, 30), np.uint16), photometric="rgb", planarconfig="separate")
    assert image_size(planar.getvalue(), "t") == (30, 20)


def test_too_many_channels_are_refused_before_decoding() -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, 6), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(InvalidTileError, match="6 channels"):
        decode_image(buf.getvalue(), "t")
