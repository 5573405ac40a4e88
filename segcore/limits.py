"""The limits on what one input may cost, in one place: every image, mask and annotation file a
user sends is checked against them before the work they bound is done (header before decoding,
size before parsing, budget before rasterising), so no input can make a process use unbounded
memory or CPU. Each limit is refused with an error naming the tile or field; the README's limits
table lists them (``LIMITS``, checked by a test).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TILE_SIDE = 8192  # pixels; also the largest tile size a pipeline may declare
MAX_TILE_PIXELS = MAX_TILE_SIDE * MAX_TILE_SIDE
MAX_CHANNELS = 4  # grey, 2-channel, RGB, RGBA
MAX_IMAGE_BYTES = 512 * 1024 * 1024  # an image or mask file: 8192² x 4 channels x 16 bits, uncompressed
MAX_JSON_BYTES = 64 * 1024 * 1024  # an annotation file (JSON), per tile or for the whole set
MAX_JSON_DEPTH = 32  # nesting of JSON arrays and objects (GeoJSON needs 6)
MAX_VERTICES_PER_SHAPE = 50_000
MAX_VERTICES_PER_TILE = 2_000_000  # over all shapes of one tile
MAX_COORDINATE = 1_000_000.0  # |x|, |y| in pixels: beyond the tile is clipped, beyond this refused
# Rasterising costs one step per pixel row each polygon edge spans: at most this many per pixel of
# the tile, over all its shapes (a plain outline spans each row it covers twice).
MAX_ROW_CROSSINGS_PER_PIXEL = 16
MAX_RLE_RUNS = MAX_TILE_PIXELS + 1  # runs of one COCO RLE (each at least one pixel, and a leading 0)


@dataclass(frozen=True)
class Limit:
    what: str
    value: str
    refused_as: str


LIMITS = (
    Limit("pixels per tile (image or mask), read from the file's header before decoding",
          f"{MAX_TILE_SIDE} x {MAX_TILE_SIDE}, and each side at most the pipeline's tile size",
          "TOO_LARGE naming the tile"),
    Limit("channels per image", f"{MAX_CHANNELS}", "UNREADABLE naming the tile"),
    Limit("bytes per image or mask file", f"{MAX_IMAGE_BYTES // 2**20} MiB", "TOO_LARGE naming the tile"),
    Limit("bytes per annotation file (JSON)", f"{MAX_JSON_BYTES // 2**20} MiB",
          "TOO_LARGE naming the tile, or `annotations` for one file of the whole set"),
    Limit("JSON nesting depth", f"{MAX_JSON_DEPTH}", "UNREADABLE naming the tile, or `annotations`"),
    Limit("vertices per shape", f"{MAX_VERTICES_PER_SHAPE:,}", "TOO_COMPLEX naming the tile and the shape"),
    Limit("vertices per tile, over all its shapes", f"{MAX_VERTICES_PER_TILE:,}", "TOO_COMPLEX naming the tile"),
    Limit("polygon edge x pixel-row crossings per tile, over all its shapes",
          f"{MAX_ROW_CROSSINGS_PER_PIXEL} per pixel of the tile", "TOO_COMPLEX naming the tile and the shape"),
    Limit("coordinate magnitude", f"{MAX_COORDINATE:,.0f} pixels (NaN and infinity refused)",
          "BAD_FORMAT naming the tile and the shape"),
    Limit("runs per COCO RLE", "pixels of the tile + 1 (decoded in linear time)",
          "BAD_FORMAT naming the tile and the annotation"),
)


def markdown_table() -> str:
    """The README's table of these limits."""
    rows = ["| Limit | Value | Refused as |", "|---|---|---|"]
    rows += [f"| {limit.what} | {limit.value} | {limit.refused_as} |" for limit in LIMITS]
    return "\n".join(rows)
