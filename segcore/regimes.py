"""Synthetic labelled tiles in several realistic microscopy imaging regimes.

This module owns the generation of fully labelled tile sets whose *pixel
encoding* mimics real acquisitions, so tests and the quality benchmark can
check that training copes with more than 8-bit RGB:

* ``brightfield-8bit``   - ``segcore.synthetic`` tiles (uint8 RGB, 3 classes);
* ``fluorescence-16bit`` - uint16 grey from a 16-bit sCMOS-like camera whose
  signal fills under 1 % of the range (offset ~100, maxima ~300-600, < 655);
* ``fluorescence-12bit`` - the same scenes from a 12-bit camera, stored in a
  uint16 container (0..4095, maxima well above 1000);
* ``float-offset``       - the same scenes as float32 in arbitrary units on a
  large offset (``1e4 + 2.5 * photo-electrons``, never near [0, 1]);
* ``he-rgb``             - uint8 RGB H&E-like stain (nuclei vs. stroma).

It also owns writing such a set to disk: ``<name><suffix>`` images (PNG for
8-bit and 16-bit integers, TIFF otherwise) and ``<name>.png`` 8-bit masks.

As in ``segcore.synthetic``, tiles are cut from larger source images that share
one per-image style (exposure, illumination, stain batch, optics, noise), and
every source image has its own ``SeedSequence.spawn`` stream, so a smaller
``count`` yields a prefix of a larger one. The three fluorescence regimes share
one scene model and one scene stream: for the same seed they have identical
masks and differ only in how the camera encodes the light.

Fluorescence image formation, in photo-electrons: fluorophore map (per-nucleus
brightness, chromatin texture) plus dim background autofluorescence, times a
per-image exposure factor and a smooth illumination field (vignetting), optical
blur, Poisson shot noise, then camera gain, offset and Gaussian read noise.
H&E follows the Beer-Lambert model of ``segcore.synthetic``.

Only numpy, pillow, tifffile and the standard library are used (no torch).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from segcore import synthetic
from segcore.synthetic import _halo_shape, _random_harmonics, _rasterize, _Shape, _smooth_noise

__all__ = [
    "REGIMES",
    "RegimeTile",
    "class_names",
    "encode_image",
    "generate_regime",
    "tile_suffix",
    "write_regime_set",
]

REGIMES: tuple[str, ...] = ("brightfield-8bit", "fluorescence-16bit", "fluorescence-12bit", "float-offset", "he-rgb")

_NUCLEUS_CLASSES: list[str] = ["background", "nucleus"]
_NUCLEUS = 1
_REF_TILE = 128.0  # geometry is defined for 128 px tiles and scaled to others
_FLUOR_MAX = 2.0  # hard cap of the relative fluorophore map (bounds the signal)

# H&E stain OD directions (Ruifrok), as in segcore.synthetic.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class RegimeTile:
    """One generated tile: image in its regime's native dtype plus class mask."""

    name: str  # e.g. "img03_tile02"
    source_image: str  # e.g. "img03"; tiles of one source image share its style
    image: np.ndarray  # H x W (grey) or H x W x 3 (RGB); uint8, uint16 or float32
    mask: np.ndarray  # uint8 H x W class indices, see class_names(regime)


@dataclass(frozen=True)
class _Camera:
    """How one regime turns photo-electrons into stored pixel values."""

    dtype: type[np.generic]
    offset: float  # bias added by the electronics (output units)
    gain: float  # output units per photo-electron
    signal_e: float  # electrons per unit fluorophore at exposure 1, full illumination
    autofluor_e: tuple[float, float]  # range of background autofluorescence (electrons)
    ceiling: float  # largest value stored (ADC saturation / regime contract)


_CAMERAS: dict[str, _Camera] = {
    # Worst case (exposure 1.5, fluor 2.0, autofluor 20 e-): mean 100 + 405 counts,
    # +6 sigma shot/read noise ~ 626 < 655; the ceiling is a guard, not a look.
    "fluorescence-16bit": _Camera(np.uint16, 100.0, 1.0, 125.0, (8.0, 20.0), 654.0),
    "fluorescence-12bit": _Camera(np.uint16, 100.0, 1.0, 1100.0, (60.0, 150.0), 4095.0),
    "float-offset": _Camera(np.float32, 1.0e4, 2.5, 300.0, (8.0, 20.0), math.inf),
}


@dataclass(frozen=True)
class _Acquisition:
    """Per-source-image acquisition settings shared by all its tiles."""

    exposure: float  # multiplies all emitted light
    autofluor_e: float  # background autofluorescence level (electrons)
    blur_sigma: float  # optics point-spread (Gaussian sigma, px)
    read_sigma_e: float  # camera read noise (electrons)


@dataclass(frozen=True)
class _StainStyle:
    """Per-source-image H&E look (staining batch, scanner)."""

    glass_rgb: np.ndarray  # float, 3, unstained glass 0..255
    hematoxylin_od: np.ndarray  # float, 3, OD at full nuclear stain
    eosin_od: np.ndarray  # float, 3, OD at full stroma stain
    fibre_angle: float  # dominant stroma fibre direction, radians
    blur_sigma: float
    noise_sigma: float


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def class_names(regime: str) -> list[str]:
    """Class names of ``regime``; index 0 is always ``"background"``."""
    _check_regime(regime)
    if regime == "brightfield-8bit":
        return list(synthetic.CLASS_NAMES)
    return list(_NUCLEUS_CLASSES)


def tile_suffix(regime: str) -> str:
    """File suffix of ``regime``'s images: ``.tif`` for float data, else ``.png``."""
    _check_regime(regime)
    return ".tif" if regime == "float-offset" else ".png"


def generate_regime(
    regime: str, count: int, *, tile_size: int = 128, seed: int = 0, tiles_per_image: int = 4
) -> list[RegimeTile]:
    """Generate ``count`` labelled tiles of ``regime``, ``tiles_per_image`` per source image.

    Deterministic for ``(regime, seed)``; source image ``i`` depends only on
    ``(seed, i)``, so a smaller ``count`` yields a prefix of a larger one.
    """
    _check_regime(regime)
    if regime == "brightfield-8bit":
        return [
            RegimeTile(t.name, t.source_image, t.image, t.mask)
            for t in synthetic.generate_tiles(count, tile_size=tile_size, seed=seed, tiles_per_image=tiles_per_image)
        ]
    return [RegimeTile(*cut) for cut in synthetic.cut_tiles(count, _renderer(regime), tile_size=tile_size, seed=seed,
                                                            tiles_per_image=tiles_per_image)]


def encode_image(image: np.ndarray) -> bytes:
    """Encode an image losslessly: PNG for uint8 grey/RGB and uint16 grey, else TIFF."""
    if _is_png_encodable(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()
    rgb_like = image.ndim == 3 and image.shape[2] in (3, 4)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="rgb" if rgb_like else "minisblack")
    return buffer.getvalue()


def write_regime_set(tiles: Sequence[RegimeTile], tiles_dir: Path, masks_dir: Path) -> None:
    """Write ``<name><suffix>`` images into ``tiles_dir`` and ``<name>.png`` masks into ``masks_dir``.

    The suffix follows ``encode_image`` (``.png`` or ``.tif``), matching
    ``tile_suffix`` of the tile's regime. Masks are single-channel 8-bit PNGs
    whose pixel values are the class indices.
    """
    tiles_dir = Path(tiles_dir)
    masks_dir = Path(masks_dir)
    tiles_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for tile in tiles:
        if tile.mask.dtype != np.uint8 or tile.mask.shape != tile.image.shape[:2]:
            raise ValueError(f"{tile.name}: mask must be uint8 HxW matching the image")
        suffix = ".png" if _is_png_encodable(tile.image) else ".tif"
        (tiles_dir / f"{tile.name}{suffix}").write_bytes(encode_image(tile.image))
        Image.fromarray(tile.mask).save(masks_dir / f"{tile.name}.png")


# --------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; valid regimes: {', '.join(REGIMES)}")


def _is_png_encodable(image: np.ndarray) -> bool:
    if image.dtype == np.uint8:
        return image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    return image.dtype == np.uint16 and image.ndim == 2


_Rendered = list[tuple[np.ndarray, np.ndarray]]


def _renderer(regime: str) -> Callable[[np.random.SeedSequence, int, int], _Rendered]:
    """Source-image renderer (seed stream, tile size, tile count) -> tiles."""
    if regime == "he-rgb":
        return _render_he_source
    camera = _CAMERAS[regime]

    def render(seq: np.random.SeedSequence, tile_size: int, n_tiles: int) -> _Rendered:
        return _render_fluorescence_source(seq, camera, tile_size, n_tiles)

    return render


def _layout(tile_size: int, n_tiles: int) -> tuple[int, int]:
    """Grid (rows, cols) of tiles that make up one source image."""
    cols = math.ceil(math.sqrt(n_tiles))
    return math.ceil(n_tiles / cols), cols


def _canvas(tile_size: int, n_tiles: int) -> tuple[int, int, float]:
    """Height and width of a source image of ``n_tiles`` tiles, and the geometry scale."""
    rows, cols = _layout(tile_size, n_tiles)
    return rows * tile_size, cols * tile_size, tile_size / _REF_TILE


def _cut_tiles(image: np.ndarray, mask: np.ndarray, tile_size: int, n_tiles: int) -> _Rendered:
    _rows, cols = _layout(tile_size, n_tiles)
    out: _Rendered = []
    for i in range(n_tiles):
        y0, x0 = (i // cols) * tile_size, (i % cols) * tile_size
        sl = (slice(y0, y0 + tile_size), slice(x0, x0 + tile_size))
        out.append((image[sl].copy(), mask[sl].copy()))
    return out


def _region_origins(tile_size: int, n_tiles: int) -> list[tuple[int, int]]:
    rows, cols = _layout(tile_size, n_tiles)
    return [(r * tile_size, c * tile_size) for r in range(rows) for c in range(cols)]


# --------------------------------------------------------------------------
# Fluorescence scene and acquisition
# --------------------------------------------------------------------------


def _render_fluorescence_source(
    seq: np.random.SeedSequence, camera: _Camera, tile_size: int, n_tiles: int
) -> _Rendered:
    """Render one fluorescence source image (shared scene stream, camera stream)."""
    scene_seq, camera_seq = seq.spawn(2)
    fluor, mask = _fluorescence_scene(np.random.default_rng(scene_seq), tile_size, n_tiles)
    image = _acquire(np.random.default_rng(camera_seq), fluor, camera, tile_size / _REF_TILE)
    return _cut_tiles(image, mask, tile_size, n_tiles)


def _fluorescence_scene(rng: np.random.Generator, tile_size: int, n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative fluorophore map (nuclei ~0.5-1.9, background 0) and its mask."""
    h, w, scale = _canvas(tile_size, n_tiles)
    fluor = np.zeros((h, w), dtype=np.float32)
    mask = np.zeros((h, w), dtype=np.uint8)
    chromatin = _smooth_noise(rng, h, w, cell_sizes=(2.5 * scale, 5.0 * scale), weights=(0.6, 1.0))
    density = float(np.exp(rng.normal(0.0, 0.3)))
    _populate(
        rng, tile_size, n_tiles, scale, mean_count=7.0 * density, halo_probability=0.4, bud_probability=0.25,
        # Dim cytoplasmic autofluorescence: unlabelled background clutter.
        halo=lambda c: _paint_halo(rng, fluor, c, scale, strength=rng.uniform(0.03, 0.08), eosin=None),
        nucleus=lambda c: _paint_fluor_nucleus(rng, fluor, mask, chromatin, c, scale),
    )
    return np.minimum(fluor, _FLUOR_MAX), mask


def _populate(
    rng: np.random.Generator, tile_size: int, n_tiles: int, scale: float, *, mean_count: float,
    halo_probability: float, bud_probability: float, halo: Callable[[tuple[float, float]], None],
    nucleus: Callable[[tuple[float, float]], None],
) -> None:
    """Scatters cells over every tile region: first a halo behind some of them, then each nucleus,
    sometimes with a touching neighbour (dividing or clustered cells)."""
    for origin in _region_origins(tile_size, n_tiles):
        centres = _scatter(rng, origin, tile_size, mean_count)
        for centre in centres:
            if rng.random() < halo_probability:
                halo(centre)
        for centre in centres:
            nucleus(centre)
            if rng.random() < bud_probability:
                nucleus(_bud(rng, centre, scale))


def _scatter(
    rng: np.random.Generator, origin: tuple[int, int], tile_size: int, mean_count: float
) -> list[tuple[float, float]]:
    """Object centres inside one tile region (objects may cross its border)."""
    n = int(rng.poisson(2.5 if rng.random() < 0.08 else mean_count))
    y0, x0 = origin
    return [(y0 + rng.uniform(0, tile_size), x0 + rng.uniform(0, tile_size)) for _ in range(n)]


def _bud(rng: np.random.Generator, centre: tuple[float, float], scale: float) -> tuple[float, float]:
    ang = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(12.0, 17.0) * scale
    return (centre[0] + dist * math.sin(ang), centre[1] + dist * math.cos(ang))


def _nucleus_shape(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, aspect: float, wobble: float
) -> _Shape:
    return _Shape(
        cy=centre[0],
        cx=centre[1],
        semi_major=radius * math.sqrt(aspect),
        semi_minor=radius / math.sqrt(aspect),
        angle=rng.uniform(0, math.pi),
        harmonics=_random_harmonics(rng, amplitude=wobble, k_max=6),
    )


def _paint_fluor_nucleus(
    rng: np.random.Generator,
    fluor: np.ndarray,
    mask: np.ndarray,
    chromatin: np.ndarray,
    centre: tuple[float, float],
    scale: float,
) -> None:
    """Slightly irregular ellipse, brighter centre (thicker), chromatin texture."""
    radius = rng.uniform(6.0, 11.0) * scale
    shape = _nucleus_shape(rng, centre, radius, rng.uniform(1.0, 1.5), wobble=0.08)
    region = _rasterize(shape, mask.shape, softness=0.7)
    if region is None:
        return
    sl, alpha, depth = region
    profile = 0.75 + 0.25 * (1.0 - np.exp(-depth / (0.35 * radius)))
    texture = 1.0 + 0.15 * np.clip(chromatin[sl], -2.5, 2.5)
    brightness = rng.uniform(0.5, 1.5)
    fluor[sl] += (alpha * profile * texture * brightness).astype(np.float32)
    mask[sl][alpha >= 0.5] = _NUCLEUS


def _paint_halo(
    rng: np.random.Generator,
    target: np.ndarray,
    centre: tuple[float, float],
    scale: float,
    *,
    strength: float,
    eosin: np.ndarray | None,
) -> None:
    """Soft-edged cytoplasm around a nucleus; never labelled (background).

    ``eosin`` given: ``target`` is an RGB OD map stained along that vector;
    otherwise it is a single-channel fluorophore map.
    """
    region = _rasterize(_halo_shape(rng, centre, scale), target.shape[:2], softness=4.0 * scale)
    if region is None:
        return
    sl, alpha, _depth = region
    amount = (alpha * strength).astype(np.float32)
    if eosin is None:
        target[sl] += amount
    else:
        target[sl] += amount[..., None] * eosin.astype(np.float32)


def _acquire(rng: np.random.Generator, fluor: np.ndarray, camera: _Camera, scale: float) -> np.ndarray:
    """Photo-electrons -> stored values: exposure, illumination, blur, noise, camera."""
    h, w = fluor.shape
    acq = _Acquisition(
        exposure=float(rng.uniform(0.5, 1.5)),
        autofluor_e=float(rng.uniform(*camera.autofluor_e)),
        blur_sigma=float(rng.uniform(0.8, 1.4)) * scale,
        read_sigma_e=float(rng.uniform(2.0, 4.0)),
    )
    # Autofluorescence is not flat either: a slow +-15 % texture.
    patchiness = _smooth_noise(rng, h, w, cell_sizes=(40 * scale,), weights=(1.0,))
    auto = acq.autofluor_e * np.clip(1.0 + 0.15 * patchiness, 0.5, 1.5)
    emitted = (auto + camera.signal_e * fluor) * acq.exposure * _illumination(rng, h, w, scale)
    expected = np.clip(_gaussian_blur(emitted, acq.blur_sigma), 0.0, None)
    electrons = rng.poisson(expected).astype(np.float32)
    read = rng.normal(0.0, acq.read_sigma_e * camera.gain, size=(h, w)).astype(np.float32)
    values = np.clip(camera.offset + camera.gain * electrons + read, 0.0, camera.ceiling)
    if np.issubdtype(camera.dtype, np.integer):
        values = np.rint(values)
    return values.astype(camera.dtype)


def _illumination(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Multiplicative field in [0.6, 1.0]: off-centre vignetting plus slow shading."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / float(max(h, w) ** 2)
    shading = _smooth_noise(rng, h, w, cell_sizes=(96 * scale,), weights=(1.0,))
    field = 1.0 - rng.uniform(0.3, 0.8) * r2 + 0.04 * shading
    return np.clip(field / float(field.max()), 0.6, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of H x W (x C) float data, edges replicated.

    Pillow only blurs 8-bit images, and the fluorescence signal must keep its
    full precision, so this is a small numpy implementation.
    """
    out = image.astype(np.float32)
    if sigma <= 0.0:
        return out
    radius = max(1, math.ceil(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, weight in enumerate(taps):
            acc += weight * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


# --------------------------------------------------------------------------
# H&E (Beer-Lambert, hematoxylin nuclei on eosin stroma)
# --------------------------------------------------------------------------


def _render_he_source(seq: np.random.SeedSequence, tile_size: int, n_tiles: int) -> _Rendered:
    """Render one H&E source image: textured stroma, cytoplasm, nuclei."""
    rng = np.random.default_rng(seq)
    h, w, scale = _canvas(tile_size, n_tiles)
    style = _random_stain_style(rng)
    od = _stroma(rng, h, w, scale, style.fibre_angle)[..., None] * style.eosin_od.astype(np.float32)
    mask = np.zeros((h, w), dtype=np.uint8)
    chromatin = _smooth_noise(rng, h, w, cell_sizes=(2.5 * scale, 6.0 * scale), weights=(1.0, 0.7))
    density = float(np.exp(rng.normal(0.0, 0.3)))
    _populate(
        rng, tile_size, n_tiles, scale, mean_count=9.0 * density, halo_probability=0.5, bud_probability=0.2,
        halo=lambda c: _paint_halo(rng, od, c, scale, strength=rng.uniform(0.15, 0.3), eosin=style.eosin_od),
        nucleus=lambda c: _paint_he_nucleus(rng, od, mask, chromatin, style, c, scale),
    )
    return _cut_tiles(_form_rgb(rng, od, style), mask, tile_size, n_tiles)


def _random_stain_style(rng: np.random.Generator) -> _StainStyle:
    """Draw one slide's stain batch (hue jitter, strengths) and scanner optics."""
    hema = np.clip(_HEMATOXYLIN + rng.normal(0.0, 0.05, 3), 0.05, None)
    eosin = np.clip(_EOSIN + rng.normal(0.0, 0.04, 3), 0.02, None)
    glass = np.array([240.0, 236.0, 241.0]) + rng.normal(0.0, 4.0, 3)
    return _StainStyle(
        glass_rgb=np.clip(glass, 215.0, 255.0),
        hematoxylin_od=hema / np.linalg.norm(hema) * rng.uniform(0.9, 1.4),
        eosin_od=eosin / np.linalg.norm(eosin) * rng.uniform(0.3, 0.6),
        fibre_angle=float(rng.uniform(0, math.pi)),
        blur_sigma=float(rng.uniform(0.5, 1.0)),
        noise_sigma=float(rng.uniform(2.0, 4.0)),
    )


def _stroma(rng: np.random.Generator, h: int, w: int, scale: float, angle: float) -> np.ndarray:
    """Relative eosin density (~0-1.2): wavy collagen fibres with white gaps."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = _smooth_noise(rng, h, w, cell_sizes=(48 * scale, 16 * scale), weights=(1.0, 0.6))
    period = rng.uniform(8.0, 14.0) * scale
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + 4.0 * warp
    # Fibre contrast itself varies (loose vs. dense collagen).
    contrast = np.clip(0.5 + 0.5 * _smooth_noise(rng, h, w, cell_sizes=(32 * scale,), weights=(1.0,)), 0.0, 1.0)
    fibres = contrast * (0.5 + 0.5 * np.sin(phase)) ** 2
    fine = _smooth_noise(rng, h, w, cell_sizes=(3.0 * scale, 8.0 * scale), weights=(1.0, 0.8))
    density = 0.6 + 0.3 * fibres + 0.12 * fine
    # Lumina / tears: the top ~15 % of a coarse field becomes nearly unstained.
    coarse = _smooth_noise(rng, h, w, cell_sizes=(56 * scale,), weights=(1.0,))
    gaps = np.clip((coarse - 1.0) / 0.3, 0.0, 1.0)
    return np.clip(density * (1.0 - 0.9 * gaps), 0.0, None).astype(np.float32)


def _paint_he_nucleus(
    rng: np.random.Generator,
    od: np.ndarray,
    mask: np.ndarray,
    chromatin: np.ndarray,
    style: _StainStyle,
    centre: tuple[float, float],
    scale: float,
) -> None:
    """Hematoxylin blob: mostly round epithelial nuclei, some spindle (fibroblast) ones."""
    spindle = rng.random() < 0.2
    radius = rng.uniform(5.0, 8.0 if spindle else 11.0) * scale
    aspect = rng.uniform(2.0, 3.5) if spindle else rng.uniform(1.0, 1.5)
    region = _rasterize(_nucleus_shape(rng, centre, radius, aspect, wobble=0.1), mask.shape, softness=0.8)
    if region is None:
        return
    sl, alpha, depth = region
    texture = 0.8 + 0.3 * np.clip(chromatin[sl], -2.0, 2.0) * 0.5
    rim = 1.0 + 0.2 * np.exp(-depth / 2.0)  # denser nuclear membrane
    strength = alpha * texture * rim * rng.uniform(0.8, 1.2)
    od[sl] += strength[..., None].astype(np.float32) * style.hematoxylin_od.astype(np.float32)
    mask[sl][alpha >= 0.5] = _NUCLEUS


def _form_rgb(rng: np.random.Generator, od: np.ndarray, style: _StainStyle) -> np.ndarray:
    """Transmitted light through the stains, scanner blur and sensor noise -> uint8."""
    h, w = od.shape[:2]
    shading = _smooth_noise(rng, h, w, cell_sizes=(96.0,), weights=(1.0,))
    light = (1.0 + 0.02 * shading)[..., None] * style.glass_rgb.astype(np.float32) * np.exp(-od)
    blurred = _gaussian_blur(light, style.blur_sigma)
    noise = rng.normal(0.0, style.noise_sigma, size=(h, w, 3)).astype(np.float32)
    return np.clip(np.rint(blurred + noise), 0.0, 255.0).astype(np.uint8)
