"""In-memory tiles to training batches: validation, batching, augmentation.

This module owns how ``Sample`` objects become ``(images, masks)`` tensors:
* a sample is prepared once (checked, and its normalization measured over the
  whole tile as a per-channel affine map) and kept in its native pixel type;
  only the part a batch uses (a training crop) is converted to float32, so a
  128² crop of a 512² tile costs a sixteenth of the tile's conversion;
* every random choice (order, crops, flips, jitter) draws from explicit
  ``torch.Generator`` objects (training seeds one per epoch and one per tile
  and epoch, see segcore.distributed), so the whole data pipeline is
  reproducible from a seed;
* batches of different tile sizes are padded, with padded mask pixels set to
  the ignore index so they count in neither loss nor metrics.

Batch-of-one policy: UperNet's 1x1 pyramid-pooling branch ends in BatchNorm,
which cannot train on a single sample. When the last batch of an epoch would
hold exactly one tile it is merged into the previous batch (no tile is
dropped); a training set of a single tile is batched with a second,
independently augmented view of itself. A batch size of exactly 1, asked for
explicitly, is honoured: the training loop then runs BatchNorm layers on their
running statistics (see segcore.training), as detection frameworks do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segcore.errors import InvalidParameterError, InvalidTileError
from segcore.hyperparameters import MIN_INPUT_SIZE
from segcore.imaging import Normalization
from segcore.intensity import ImageMeasures, apply_affine, measure

# Photometric jitter, relative to each image's own intensity scale (its mean and standard deviation
# per channel after normalization), so it can never swamp the signal of a dim image:
# x' = mean + gain * (x - mean) + bias * std, gain in [0.9, 1.1], bias in [-0.2, 0.2].
_JITTER_GAIN = 0.1
_JITTER_BIAS = 0.2


@dataclass
class Sample:
    """One annotated tile: ``H x W x 3`` image in its native pixel type and units (see
    segcore.imaging), ``H x W`` integer class mask."""

    tile_id: str
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class PreparedSample:
    """A checked tile, still in its native pixel type: the network sees
    ``image * scale + offset`` per channel (``pixels``)."""

    image: np.ndarray  # H x W x 3, native pixel type
    mask: np.ndarray  # H x W, native integer type
    scale: np.ndarray  # (3,) float64: the tile's normalization as an affine map
    offset: np.ndarray  # (3,) float64
    mean: torch.Tensor  # C x 1 x 1: the network input's own per-channel mean (the jitter's reference)
    std: torch.Tensor  # C x 1 x 1: and standard deviation (unbiased), over the whole tile

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.mask.nbytes

    def cropped(self, top: int, left: int, size: int) -> PreparedSample:
        """The window at (`top`, `left`) of at most `size` x `size`, with the whole tile's
        normalization (a copy: it travels between processes without the rest of the tile)."""
        window = (slice(top, top + size), slice(left, left + size))
        return PreparedSample(self.image[window].copy(), self.mask[window].copy(), self.scale, self.offset,
                              self.mean, self.std)

    def pixels(self, top: int = 0, left: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input (float32 C x h x w) and mask (int64 h x w) of the window at
        (`top`, `left`) of at most `size` x `size` (the whole tile without a size)."""
        image, mask = self.image, self.mask
        if size is not None:
            image, mask = image[top : top + size, left : left + size], mask[top : top + size, left : left + size]
        pixels = torch.from_numpy(apply_affine(image, self.scale, self.offset)).permute(2, 0, 1).contiguous()
        return pixels, torch.from_numpy(mask.astype(np.int64))


def prepare_samples(
    samples: Sequence[Sample],
    norm: Normalization,
    num_classes: int,
    ignore_index: int,
    *,
    field: str,
) -> list[PreparedSample]:
    """Check and prepare every sample (all at once: for sets that fit in memory; training streams
    them through segcore.tiles)."""
    if not samples:
        raise InvalidParameterError(field, "need at least one sample")
    return [prepare_sample(s, norm, num_classes, ignore_index) for s in samples]


def prepare_sample(sample: Sample, norm: Normalization, num_classes: int, ignore_index: int,
                   measured: ImageMeasures | None = None) -> PreparedSample:
    """One checked sample with its normalization measured (one pass over the tile, no float copy).
    With `measured` (what a checking pass over the set found for this tile, under `norm`'s
    mode) the tile's values are neither checked nor measured again, only its shapes."""
    image, mask = np.asarray(sample.image), np.asarray(sample.mask)
    if measured is None:
        check_sample(sample, num_classes, ignore_index)
        measured = measure(image, norm.mode, norm.percentile_low, norm.percentile_high)
    else:
        _check_shapes(sample.tile_id, image, mask)
    scale, offset = measured.standardizing(norm)
    count = measured.count
    native_mean = measured.sums / count
    native_var = np.maximum(measured.squares - count * np.square(native_mean), 0.0) / max(count - 1, 1)
    mean = native_mean * scale + offset
    std = np.sqrt(native_var) * np.abs(scale) if count > 1 else np.zeros(3)
    as_channels = lambda v: torch.tensor(v, dtype=torch.float32).view(3, 1, 1)  # noqa: E731
    return PreparedSample(image, mask, scale, offset, as_channels(mean), as_channels(std))


def check_sample(sample: Sample, num_classes: int, ignore_index: int) -> None:
    """InvalidTileError naming the tile when its image or mask cannot be trained on."""
    image, mask = np.asarray(sample.image), np.asarray(sample.mask)
    _check_shapes(sample.tile_id, image, mask)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InvalidTileError(sample.tile_id, "image contains NaN or infinite values")
    labelled = mask[mask != ignore_index]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= num_classes):
        bad = int(labelled.max()) if labelled.max() >= num_classes else int(labelled.min())
        raise InvalidTileError(
            sample.tile_id, f"mask contains class {bad} but only {num_classes} classes are configured"
        )


def _check_shapes(tile_id: str, image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidTileError(tile_id, f"image must be H x W x 3, got shape {image.shape}")
    if mask.shape != image.shape[:2]:
        raise InvalidTileError(tile_id, f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")


def plan_batches(num_samples: int, batch_size: int, generator: torch.Generator | None,
                 processes: int = 1) -> list[list[int]]:
    """Index lists for one epoch (global batches, split over `processes` by segcore.distributed);
    shuffled when a generator is given.

    Implements the batch-of-one policy described in the module docstring: a short last batch is
    merged into the previous one when it would leave a process with fewer tiles than the others
    have (and than two), so no process ever has an empty share.
    """
    if generator is None:
        order = list(range(num_samples))
    else:
        order = torch.randperm(num_samples, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    if batch_size == 1:
        return batches  # asked for explicitly: training freezes BatchNorm statistics instead
    smallest_share = min(2, batch_size // processes)
    if len(batches) > 1 and len(batches[-1]) // processes < smallest_share:
        batches[-2].extend(batches.pop())
    elif len(batches) == 1 and len(batches[0]) == 1 and generator is not None:
        batches[0].append(batches[0][0])  # a second augmented view of the only tile
    return batches


def num_train_batches(num_samples: int, batch_size: int, processes: int = 1) -> int:
    """How many batches ``plan_batches`` yields (needed up front for the LR schedule)."""
    return len(plan_batches(num_samples, batch_size, None, processes))


def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, 90-degree rotation (square tiles) and intensity jitter relative to the
    image's own per-channel ``mean`` and ``std`` (see ``_JITTER_GAIN``/``_JITTER_BIAS``)."""
    draws = torch.rand(5, generator=generator).tolist()  # one draw call: cheap and ordered
    if draws[0] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if draws[1] < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    if image.shape[-1] == image.shape[-2] and draws[2] < 0.5:
        image, mask = image.rot90(1, (-2, -1)), mask.rot90(1, (-2, -1))
    gain = 1.0 + _JITTER_GAIN * (2 * draws[3] - 1)
    bias = _JITTER_BIAS * (2 * draws[4] - 1)
    image = gain * image + ((1.0 - gain) * mean + bias * std)
    return image, mask


def crop_window(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a random ``size`` x ``size`` window (smaller tiles pass through whole)."""
    return _random_offset(height - size, generator), _random_offset(width - size, generator)


def random_crop(sample: PreparedSample, size: int, seed: int) -> PreparedSample:
    """`sample`'s random ``size`` x ``size`` window drawn from `seed` alone: the same window
    wherever it is cut (a data-loader process, or the training process for a cached tile)."""
    if sample.mask.shape[0] <= size and sample.mask.shape[1] <= size:
        return sample
    height, width = sample.mask.shape
    top, left = crop_window(height, width, size, torch.Generator().manual_seed(seed))
    return sample.cropped(top, left, size)


def _random_offset(room: int, generator: torch.Generator) -> int:
    if room <= 0:
        return 0
    return int(torch.randint(0, room + 1, (1,), generator=generator))


def collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int, min_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack into ``(B x 3 x H x W, B x H x W)``, padding to the largest tile.

    Images pad with 0 (the mean after normalisation), masks with ``ignore_index``.
    """
    height = max(MIN_INPUT_SIZE, min_size, *(m.shape[0] for _, m in items))
    width = max(MIN_INPUT_SIZE, min_size, *(m.shape[1] for _, m in items))
    images, masks = [], []
    for image, mask in items:
        pad = (0, width - mask.shape[1], 0, height - mask.shape[0])
        images.append(F.pad(image, pad, value=0.0) if any(pad) else image)
        masks.append(F.pad(mask, pad, value=ignore_index) if any(pad) else mask)
    return torch.stack(images), torch.stack(masks)


def make_batch(
    prepared: Sequence[PreparedSample],
    indices: Sequence[int],
    *,
    generator: torch.Generator | None,
    crop_size: int | None,
    augment_data: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build one batch of ``prepared[i]`` for ``i`` in ``indices`` (see ``batch_of``)."""
    return batch_of([prepared[i] for i in indices], generator=generator, crop_size=crop_size,
                    augment_data=augment_data, ignore_index=ignore_index)


def batch_of(
    samples: Sequence[PreparedSample],
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    crop_size: int | None,
    augment_data: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build one batch; ``generator=None`` means evaluation (no crop, no augmentation). The random
    choices draw from one generator, or from one generator per sample (a sequence)."""
    draws = _per_sample(generator, len(samples))
    items = []
    for sample, drawn in zip(samples, draws, strict=True):
        if drawn is not None and crop_size is not None:
            height, width = sample.mask.shape
            top, left = crop_window(height, width, crop_size, drawn)
            image, mask = sample.pixels(top, left, crop_size)
        else:
            image, mask = sample.pixels()
        if drawn is not None and augment_data:
            image, mask = augment(image, mask, drawn, sample.mean, sample.std)
        items.append((image, mask))
    # Training pads small tiles up to the crop size so every batch has one shape.
    min_size = (crop_size or 0) if generator is not None else 0
    return collate(items, ignore_index, min_size)


def _per_sample(generator: torch.Generator | Sequence[torch.Generator] | None, count: int
                ) -> Sequence[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * count
    return generator
