"""Synthetic microscopy-like training tiles for demos and tests.

This module owns the generation of realistic-looking, fully labelled sample
data: brightfield-style tiles (stained nuclei, brown debris fragments on a
textured, unevenly lit background) together with their class-index masks, and
writing such a tile set to disk as PNG pairs (``<name>.png`` in an image folder
and in a mask folder).

Tiles are cut from larger "source images" that share one per-image style
(illumination, stain colours, blur, noise), so grouping tiles by
``source_image`` is meaningful, e.g. for leakage-free train/validation splits.

The image formation is a small Beer-Lambert model: every structure contributes
optical density (OD) per RGB channel, and the pixel value is
``illumination * background_colour * exp(-OD)``. That makes overlaps darken
naturally and keeps class colours (hue) stable under illumination changes,
which is what keeps the classes learnable for a small CNN.

Only numpy, pillow and the standard library are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["CLASS_NAMES", "SyntheticTile", "generate_tiles", "write_tile_set"]

CLASS_NAMES: list[str] = ["background", "nucleus", "debris"]
_NUCLEUS = 1
_DEBRIS = 2

# Stain OD directions (per unit optical density, R/G/B). Hematoxylin absorbs
# red/green -> blue-purple; a DAB-like stain absorbs blue -> brown; eosin
# absorbs green -> pink. Standard colour-deconvolution vectors (Ruifrok).
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_BROWN = np.array([0.27, 0.57, 0.78])
_EOSIN = np.array([0.07, 0.99, 0.11])

# Reference geometry is defined for 128 px tiles and scaled to other sizes so
# the pixel fractions of each class do not depend on the tile size.
_REF_TILE = 128.0


@dataclass(frozen=True)
class SyntheticTile:
    """One generated tile: RGB image plus per-pixel class indices."""

    name: str  # e.g. "img03_tile05"
    source_image: str  # e.g. "img03": the larger image the tile was cut from
    image: np.ndarray  # uint8, H x W x 3, RGB
    mask: np.ndarray  # uint8, H x W, values in 0..len(CLASS_NAMES)-1


@dataclass(frozen=True)
class _ImageStyle:
    """Per-source-image appearance shared by all tiles cut from it."""

    background_rgb: np.ndarray  # float, 3, unstained "glass" colour 0..255
    nucleus_od: np.ndarray  # float, 3, OD vector at full stain strength
    debris_od: np.ndarray  # float, 3
    tissue_od: float  # strength of the faint eosin background texture
    blur_radius: float  # optics blur (PIL GaussianBlur radius, px)
    noise_sigma: float  # per-pixel sensor noise (grey levels)
    density: float  # multiplies the expected object count per tile


@dataclass(frozen=True)
class _Shape:
    """Star-shaped outline: rotated ellipse with a noise-perturbed radius."""

    cy: float
    cx: float
    semi_major: float
    semi_minor: float
    angle: float  # rotation of the major axis, radians
    harmonics: np.ndarray  # (k, amplitude, phase) rows perturbing the radius
    bend: float = 0.0  # curvature along the major axis (fibres), 1/px


def generate_tiles(
    count: int, *, tile_size: int = 128, seed: int = 0, tiles_per_image: int = 4
) -> list[SyntheticTile]:
    """Generate ``count`` labelled tiles, ``tiles_per_image`` per source image.

    Deterministic for a given ``seed``; source image ``i`` depends only on
    ``(seed, i)``, so a smaller ``count`` yields a prefix of a larger one.
    """
    def render(child: np.random.SeedSequence, size: int, n_tiles: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return _render_source_image(np.random.default_rng(child), size, n_tiles)

    return [SyntheticTile(*cut) for cut in cut_tiles(count, render, tile_size=tile_size, seed=seed,
                                                     tiles_per_image=tiles_per_image)]


SourceRenderer = Callable[[np.random.SeedSequence, int, int], Sequence[tuple[np.ndarray, np.ndarray]]]


def cut_tiles(count: int, render: SourceRenderer, *, tile_size: int, seed: int, tiles_per_image: int
              ) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(name, source_image, image, mask)`` of ``count`` tiles, ``tiles_per_image`` per source
    image; ``render(stream, tile_size, tiles_per_image)`` draws one source image's tiles.

    Source image ``i`` gets its own ``SeedSequence.spawn`` stream and is always rendered whole, so
    images do not shift when ``count`` changes and a smaller ``count`` is a prefix of a larger one.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if tile_size < 16:
        raise ValueError(f"tile_size must be >= 16, got {tile_size}")
    if tiles_per_image < 1:
        raise ValueError(f"tiles_per_image must be >= 1, got {tiles_per_image}")
    n_images = math.ceil(count / tiles_per_image)
    digits = max(2, len(str(max(n_images, tiles_per_image) - 1)))
    tiles: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    for img_idx, child in enumerate(np.random.SeedSequence(seed).spawn(n_images)):
        source = f"img{img_idx:0{digits}d}"
        rendered = render(child, tile_size, tiles_per_image)
        n_here = min(tiles_per_image, count - len(tiles))
        tiles += [(f"{source}_tile{i:0{digits}d}", source, image, mask)
                  for i, (image, mask) in enumerate(rendered[:n_here])]
    return tiles


def write_tile_set(tiles: Sequence[SyntheticTile], tiles_dir: Path, masks_dir: Path) -> None:
    """Write ``<name>.png`` into both folders: RGB image and 8-bit class mask.

    Masks are single-channel ("L") PNGs whose pixel values are the class
    indices themselves, so they read back losslessly with any PNG reader.
    """
    tiles_dir = Path(tiles_dir)
    masks_dir = Path(masks_dir)
    tiles_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for tile in tiles:
        if tile.image.dtype != np.uint8 or tile.image.ndim != 3 or tile.image.shape[2] != 3:
            raise ValueError(f"{tile.name}: image must be uint8 HxWx3")
        if tile.mask.dtype != np.uint8 or tile.mask.shape != tile.image.shape[:2]:
            raise ValueError(f"{tile.name}: mask must be uint8 HxW matching the image")
        Image.fromarray(tile.image).save(tiles_dir / f"{tile.name}.png")
        Image.fromarray(tile.mask).save(masks_dir / f"{tile.name}.png")


# --------------------------------------------------------------------------
# Source image rendering
# --------------------------------------------------------------------------


def _render_source_image(
    rng: np.random.Generator, tile_size: int, n_tiles: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render one large source image and cut it into ``n_tiles`` tiles."""
    cols = math.ceil(math.sqrt(n_tiles))
    rows = math.ceil(n_tiles / cols)
    h, w = rows * tile_size, cols * tile_size
    style = _random_style(rng)
    scale = tile_size / _REF_TILE

    od = np.zeros((h, w, 3), dtype=np.float32)
    mask = np.zeros((h, w), dtype=np.uint8)
    # Faint stained "tissue" so the background is not flat.
    tissue = _smooth_noise(rng, h, w, cell_sizes=(48 * scale, 16 * scale), weights=(1.0, 0.5))
    od += (style.tissue_od * np.clip(0.6 + 0.4 * tissue, 0.0, None))[..., None] * _EOSIN
    # Chromatin texture shared by all nuclei of this image (fine scale).
    chromatin = _smooth_noise(rng, h, w, cell_sizes=(3.0 * scale, 6.0 * scale), weights=(1.0, 0.7))

    for r in range(rows):
        for c in range(cols):
            _populate_region(rng, od, mask, chromatin, style, (r * tile_size, c * tile_size), tile_size)

    rgb = _form_image(rng, od, style, h, w, scale)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n_tiles):
        y0, x0 = (i // cols) * tile_size, (i % cols) * tile_size
        sl = (slice(y0, y0 + tile_size), slice(x0, x0 + tile_size))
        out.append((rgb[sl].copy(), mask[sl].copy()))
    return out


def _random_style(rng: np.random.Generator) -> _ImageStyle:
    """Draw the shared look of one source image (stain batch, optics, density)."""
    background = np.array([242.0, 236.0, 240.0]) + rng.normal(0.0, 5.0, 3)
    # Jitter stain vectors a little: different staining batches differ in hue,
    # but not so much that nucleus (blue-purple) and debris (brown) converge.
    nucleus = np.clip(_HEMATOXYLIN + rng.normal(0.0, 0.05, 3), 0.05, None)
    debris = np.clip(_BROWN + rng.normal(0.0, 0.05, 3), 0.05, None)
    return _ImageStyle(
        background_rgb=np.clip(background, 200.0, 255.0),
        nucleus_od=nucleus / np.linalg.norm(nucleus) * rng.uniform(1.1, 1.5),
        debris_od=debris / np.linalg.norm(debris) * rng.uniform(0.75, 1.0),
        tissue_od=float(rng.uniform(0.06, 0.16)),
        blur_radius=float(rng.uniform(0.6, 1.2)),
        noise_sigma=float(rng.uniform(2.0, 5.0)),
        # Log-normal density: most images moderately populated, some sparse or crowded.
        density=float(np.exp(rng.normal(0.0, 0.35))),
    )


def _populate_region(
    rng: np.random.Generator,
    od: np.ndarray,
    mask: np.ndarray,
    chromatin: np.ndarray,
    style: _ImageStyle,
    origin: tuple[int, int],
    tile_size: int,
) -> None:
    """Scatter nuclei and debris whose centres fall inside one tile region.

    Objects may extend over the region border into neighbouring tiles, which
    gives touching/overlapping objects across tile edges as in real scans.
    """
    scale = tile_size / _REF_TILE
    # ~10% of tiles are nearly empty: real scans contain sparse fields.
    sparse = rng.random() < 0.1
    n_nuclei = int(rng.poisson(1.5 if sparse else 7.0 * style.density))
    n_debris = int(rng.poisson(0.5 if sparse else 3.5 * style.density))
    y0, x0 = origin

    def centre() -> tuple[float, float]:
        return (y0 + rng.uniform(0, tile_size), x0 + rng.uniform(0, tile_size))

    nucleus_centres = [centre() for _ in range(n_nuclei)]
    # Pale pink cytoplasm around some nuclei: unlabelled (background) clutter
    # that makes "anything stained = object" insufficient, as in real slides.
    for cy_cx in nucleus_centres:
        if rng.random() < 0.5:
            _paint_cytoplasm(rng, od, cy_cx, scale)

    # Debris first, nuclei on top: where they overlap, the mask says nucleus
    # (consistent rule -> learnable), while the ODs add up in the image.
    for _ in range(n_debris):
        _paint_debris(rng, od, mask, style, centre(), scale)
    for cy, cx in nucleus_centres:
        # Sometimes bud a second nucleus right next to the previous one
        # (dividing/clustered cells) to produce touching objects.
        _paint_nucleus(rng, od, mask, chromatin, style, (cy, cx), scale)
        if rng.random() < 0.2:
            ang = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(12, 18) * scale
            near = (cy + dist * math.sin(ang), cx + dist * math.cos(ang))
            _paint_nucleus(rng, od, mask, chromatin, style, near, scale)


def _paint_nucleus(
    rng: np.random.Generator,
    od: np.ndarray,
    mask: np.ndarray,
    chromatin: np.ndarray,
    style: _ImageStyle,
    centre: tuple[float, float],
    scale: float,
) -> None:
    """Roundish, slightly irregular, dark-stained blob with granular texture."""
    radius = rng.uniform(6.5, 12.0) * scale
    aspect = rng.uniform(1.0, 1.4)
    shape = _Shape(
        cy=centre[0],
        cx=centre[1],
        semi_major=radius * math.sqrt(aspect),
        semi_minor=radius / math.sqrt(aspect),
        angle=rng.uniform(0, math.pi),
        harmonics=_random_harmonics(rng, amplitude=0.10, k_max=6),
    )
    region = _rasterize(shape, mask.shape, softness=0.8)
    if region is None:
        return
    sl, alpha, depth = region
    # Chromatin granularity + a denser nuclear rim (depth small near the edge).
    texture = 0.75 + 0.35 * np.clip(chromatin[sl], -2.0, 2.0) * 0.5
    rim = 1.0 + 0.25 * np.exp(-depth / 2.0)
    strength = alpha * texture * rim * rng.uniform(0.85, 1.15)
    od[sl] += strength[..., None].astype(np.float32) * style.nucleus_od.astype(np.float32)
    mask[sl][alpha >= 0.5] = _NUCLEUS


def _paint_debris(
    rng: np.random.Generator,
    od: np.ndarray,
    mask: np.ndarray,
    style: _ImageStyle,
    centre: tuple[float, float],
    scale: float,
) -> None:
    """Elongated rod or irregular angular fragment, brown and fairly uniform."""
    bend = 0.0
    if rng.random() < 0.6:
        # Rod/fibre: long thin rotated ellipse, often slightly curved.
        major, minor = rng.uniform(12.0, 24.0) * scale, rng.uniform(3.0, 5.5) * scale
        harmonics = _random_harmonics(rng, amplitude=0.08, k_max=4)
        bend = rng.uniform(-0.3, 0.3) / major  # tip offset <= 0.3 * major
    else:
        # Fragment: lumpy polygon-like blob (strong higher harmonics).
        major, minor = rng.uniform(7.0, 12.0) * scale, rng.uniform(4.5, 7.5) * scale
        harmonics = _random_harmonics(rng, amplitude=0.3, k_max=7)
    shape = _Shape(centre[0], centre[1], major, minor, rng.uniform(0, math.pi), harmonics, bend)
    region = _rasterize(shape, mask.shape, softness=0.6)
    if region is None:
        return
    sl, alpha, _depth = region
    strength = alpha * rng.uniform(0.8, 1.2)
    od[sl] += strength[..., None].astype(np.float32) * style.debris_od.astype(np.float32)
    mask[sl][alpha >= 0.5] = _DEBRIS


def _halo_shape(rng: np.random.Generator, centre: tuple[float, float], scale: float) -> _Shape:
    """The outline of a cytoplasm halo around a nucleus at ``centre``."""
    radius = rng.uniform(14.0, 22.0) * scale
    return _Shape(
        cy=centre[0] + rng.normal(0.0, 3.0 * scale),
        cx=centre[1] + rng.normal(0.0, 3.0 * scale),
        semi_major=radius * rng.uniform(1.0, 1.3),
        semi_minor=radius,
        angle=rng.uniform(0, math.pi),
        harmonics=_random_harmonics(rng, amplitude=0.2, k_max=5),
    )


def _paint_cytoplasm(
    rng: np.random.Generator, od: np.ndarray, centre: tuple[float, float], scale: float
) -> None:
    """Faint, soft-edged eosin halo (OD only; the mask stays background)."""
    region = _rasterize(_halo_shape(rng, centre, scale), od.shape[:2], softness=4.0 * scale)
    if region is None:
        return
    sl, alpha, _depth = region
    strength = (alpha * rng.uniform(0.10, 0.22)).astype(np.float32)
    od[sl] += strength[..., None] * _EOSIN.astype(np.float32)


def _random_harmonics(rng: np.random.Generator, *, amplitude: float, k_max: int) -> np.ndarray:
    """Random Fourier perturbation of an outline, amplitude decaying with k."""
    ks = np.arange(2, k_max + 1, dtype=np.float64)
    amps = amplitude * rng.uniform(0.3, 1.0, ks.size) / np.sqrt(ks - 1.0)
    phases = rng.uniform(0, 2 * math.pi, ks.size)
    return np.stack([ks, amps, phases], axis=1)


def _rasterize(
    shape: _Shape, hw: tuple[int, ...], softness: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Anti-aliased coverage of ``shape`` inside its clipped bounding box.

    Returns the bounding-box slice, coverage ``alpha`` in [0, 1] and the
    approximate depth inside the outline (px), or None if fully off-image.
    """
    perturb_max = 1.0 + float(np.sum(shape.harmonics[:, 1]))
    # Bounding radius: outline maximum, fibre curvature offset, soft edge.
    major = shape.semi_major * perturb_max
    reach = major * (1.0 + abs(shape.bend) * major) + 2.0 * softness + 1.0
    y0, y1 = max(0, int(shape.cy - reach)), min(hw[0], int(shape.cy + reach) + 1)
    x0, x1 = max(0, int(shape.cx - reach)), min(hw[1], int(shape.cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy + 0.5 - shape.cy, xx + 0.5 - shape.cx
    cos_a, sin_a = math.cos(shape.angle), math.sin(shape.angle)
    u, v = dx * cos_a + dy * sin_a, -dx * sin_a + dy * cos_a
    # Bending the frame (parabolic offset of the minor axis) curves fibres.
    v = v - shape.bend * u * u
    theta = np.arctan2(v, u)
    dist = np.hypot(u, v)
    a, b = shape.semi_major, shape.semi_minor
    # Polar radius of the ellipse, then radial Fourier perturbation.
    edge = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    wobble = np.ones_like(theta)
    for k, amp, phase in shape.harmonics:
        wobble += amp * np.cos(k * theta + phase)
    edge *= wobble
    depth = edge - dist
    alpha = np.clip(0.5 + depth / (2.0 * softness), 0.0, 1.0)
    return (slice(y0, y1), slice(x0, x1)), alpha, np.clip(depth, 0.0, None)


def _form_image(
    rng: np.random.Generator, od: np.ndarray, style: _ImageStyle, h: int, w: int, scale: float
) -> np.ndarray:
    """Turn accumulated OD into an RGB uint8 image: light, optics, sensor."""
    # Uneven illumination: vignetting around an off-centre optical axis plus a
    # slow random shading field.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / float(max(h, w) ** 2)
    shading = _smooth_noise(rng, h, w, cell_sizes=(96 * scale,), weights=(1.0,))
    illum = 1.0 - rng.uniform(0.15, 0.35) * r2 + 0.04 * shading
    rgb = illum[..., None] * style.background_rgb.astype(np.float32) * np.exp(-od)
    # Optics blur acts on the light field, before the sensor adds noise. PIL
    # only blurs 8-bit images; quantising here is harmless next to the noise.
    light = Image.fromarray(np.clip(rgb, 0.0, 255.0).astype(np.uint8))
    blurred = np.asarray(light.filter(ImageFilter.GaussianBlur(style.blur_radius * scale)))
    noise = rng.normal(0.0, style.noise_sigma, size=(h, w, 3)).astype(np.float32)
    return np.clip(blurred + noise, 0.0, 255.0).astype(np.uint8)


def _smooth_noise(
    rng: np.random.Generator,
    h: int,
    w: int,
    *,
    cell_sizes: Sequence[float],
    weights: Sequence[float],
) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: sum of bicubically upsampled fields.

    Each ``cell_size`` is the spacing (px) of the random control grid, i.e.
    the spatial scale of that octave.
    """
    total = np.zeros((h, w), dtype=np.float32)
    for cell, weight in zip(cell_sizes, weights, strict=True):
        cell = max(cell, 1.0)
        gh, gw = math.ceil(h / cell) + 3, math.ceil(w / cell) + 3
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        big = Image.fromarray(grid).resize((round(gw * cell), round(gh * cell)), Image.Resampling.BICUBIC)
        arr = np.asarray(big)
        # Random offset so grid nodes do not line up between octaves.
        oy = int(rng.integers(0, max(1, arr.shape[0] - h + 1)))
        ox = int(rng.integers(0, max(1, arr.shape[1] - w + 1)))
        total += weight * arr[oy : oy + h, ox : ox + w]
    std = float(total.std())
    return (total - float(total.mean())) / (std if std > 0 else 1.0)
