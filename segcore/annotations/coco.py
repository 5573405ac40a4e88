"""COCO JSON: polygon and RLE segmentations of many images in one file.

This module owns the reading of COCO files (``images``, ``annotations`` and
``categories`` lists): images are matched to tiles by the stem of their
``file_name`` and checked against the tile's size; an annotation's class is its
category's name; its segmentation is a list of flat polygons (parts of one
object, united) or an RLE object, uncompressed (a list of run lengths) or
compressed (pycocotools' string). RLE is decoded here in numpy, without
pycocotools, so the package needs no compiled COCO tooling.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from segcore import limits
from segcore.annotations.canvas import Shape, to_ring
from segcore.annotations.collection import AnnotationCollection, Entry, Reader, tile_stem
from segcore.annotations.issues import ERROR, WARNING, Notes, Skip
from segcore.errors import InvalidParameterError


def decode_rle_string(counts: str, most: int = limits.MAX_RLE_RUNS) -> list[int]:
    """Run lengths from COCO's compressed RLE string (pycocotools ``rleFrString``).

    Each run is a varint of 5-bit groups, least significant first, each stored as
    ``chr(group + 48)`` so the string stays printable: bit 0x20 says another group
    follows, bit 0x10 of the last group is the sign. From the fourth run on, the
    stored value is the difference to the run two places back (so alternating
    background/foreground runs of steady length compress well). Raises ValueError,
    also for more than `most` runs or a number longer than any run of a tile can be:
    the work is linear in the string's length.
    """
    if len(counts) > _MAX_GROUPS * most:
        raise ValueError(f"the string is longer than {most:,} runs can be")
    runs: list[int] = []
    value = shift = groups = 0
    for pos, char in enumerate(counts):
        group = ord(char) - 48
        if not 0 <= group < 64:
            raise ValueError(f"character {char!r} at position {pos} cannot occur in a COCO RLE string")
        value |= (group & 0x1F) << shift
        shift += 5
        groups += 1
        if group & 0x20:
            if groups == _MAX_GROUPS:
                raise ValueError(f"the number at position {pos} is longer than any run length")
            continue
        if group & 0x10:
            value -= 1 << shift  # sign extension, as the C code's `x |= -1 << 5*k`
        if len(runs) > 2:
            value += runs[-2]
        if len(runs) == most:
            raise ValueError(f"more than {most:,} runs")
        runs.append(value)
        value = shift = groups = 0
    if shift:
        raise ValueError("the string ends in the middle of a number")
    return runs


_MAX_GROUPS = 7  # 5-bit groups of one number: 35 bits hold any run of a tile (at most 2**26 pixels)


def rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean ``height x width`` mask from COCO run lengths.

    Runs alternate background/foreground starting with background (a mask that
    starts with foreground begins with a 0 run) and walk the image column by
    column (Fortran order), as pycocotools does. Raises ValueError unless the runs
    are non-negative integers adding up to ``height * width``.
    """
    if len(counts) > height * width + 1:
        raise ValueError(f"{len(counts):,} runs for {height * width:,} pixels")
    try:
        runs = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"run lengths must be numbers ({exc})") from exc
    if runs.ndim != 1 or not np.isfinite(runs).all() or (runs < 0).any() or (runs != np.round(runs)).any():
        raise ValueError("run lengths must be a flat list of non-negative integers")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"run lengths add up to {total}, not height x width = {height * width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs.astype(np.int64))
    return np.ascontiguousarray(flat.reshape(width, height).T)


def _coco_rle(segmentation: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise Skip(ERROR, "BAD_FORMAT", "RLE segmentation needs 'size': [height, width]")
    if (size[0], size[1]) != (height, width):
        detail = f"RLE size is {size[1]}x{size[0]} (width x height) but the tile is {width}x{height}"
        raise Skip(ERROR, "SIZE_MISMATCH", detail)
    try:
        if isinstance(counts, str):
            return rle_to_mask(decode_rle_string(counts, most=height * width + 1), height, width)
        if isinstance(counts, list):
            return rle_to_mask(counts, height, width)
        raise ValueError("'counts' must be a list of run lengths or a compressed string")
    except ValueError as exc:
        raise Skip(ERROR, "BAD_FORMAT", f"bad RLE: {exc}") from exc


def _flat_ring(polygon: Any) -> np.ndarray:
    if not isinstance(polygon, list):
        raise Skip(ERROR, "BAD_FORMAT", "a polygon must be a flat list [x1, y1, x2, y2, ...]")
    if len(polygon) % 2:
        raise Skip(ERROR, "BAD_FORMAT", "a polygon has an odd number of coordinates")
    return to_ring(zip(polygon[0::2], polygon[1::2], strict=True))


def _hashable_id(value: Any) -> bool:
    # Ids become dict keys; bool is an int subclass but True == 1 would silently alias id 1.
    return isinstance(value, int | str) and not isinstance(value, bool)


def _coco_where(index: int, annotation: Any) -> str:
    ann_id = annotation.get("id") if isinstance(annotation, dict) else None
    return f"annotations[{index}] (id {ann_id})" if ann_id is not None else f"annotations[{index}]"


def _coco_shape(annotation: Any, categories: Mapping[Any, str], width: int, height: int, where: str) -> Shape:
    if not isinstance(annotation, dict):
        raise Skip(ERROR, "BAD_FORMAT", "is not an annotation object")
    category = annotation.get("category_id")
    if not _hashable_id(category) or category not in categories:
        raise Skip(ERROR, "BAD_FORMAT", f"category_id {category!r} is not in 'categories'")
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        return Shape(where, categories[category], bitmap=_coco_rle(segmentation, width, height))
    if not segmentation:
        raise Skip(WARNING, "UNSUPPORTED_GEOMETRY", "has no segmentation (a box-only annotation?); skipped")
    if not isinstance(segmentation, list):
        raise Skip(ERROR, "BAD_FORMAT", "segmentation must be a list of polygons or an RLE object")
    if all(isinstance(v, int | float) for v in segmentation):
        segmentation = [segmentation]  # some exporters drop the outer list of a single polygon
    # Several polygons of one annotation are parts of one object: united, not XOR-ed.
    return Shape(where, categories[category], [[_flat_ring(polygon)] for polygon in segmentation])


def _coco_reader(categories: Mapping[Any, str]) -> Reader:
    # A closure because shapes need the file's category names, which only the loader knows.
    def read(items: list[tuple[int, Any]], width: int, height: int, notes: Notes) -> Iterator[Shape]:
        for index, annotation in items:
            where = _coco_where(index, annotation)
            try:
                yield _coco_shape(annotation, categories, width, height, where)
            except Skip as skip:
                notes.add(skip.severity, skip.code, skip.detail, where)

    return read


def _declared_size(image: Mapping[str, Any]) -> tuple[int, int] | None:
    width, height = image.get("width"), image.get("height")
    return (width, height) if isinstance(width, int) and isinstance(height, int) else None


def _coco_categories(categories: list[Any], notes: Notes) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for index, category in enumerate(categories):
        if isinstance(category, dict) and _hashable_id(category.get("id")) and isinstance(category.get("name"), str):
            names[category["id"]] = category["name"]
        else:
            notes.add(ERROR, "BAD_FORMAT", "needs an 'id' and a 'name'", f"categories[{index}]")
    return names


def _coco_images(images: list[Any], notes: Notes) -> tuple[dict[Any, str], dict[str, Entry]]:
    """Image id -> tile stem, and one entry per stem (two files with one stem are ambiguous: error)."""
    by_id: dict[Any, str] = {}
    entries: dict[str, Entry] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        if not (isinstance(image, dict) and _hashable_id(image.get("id")) and isinstance(image.get("file_name"), str)):
            notes.add(ERROR, "BAD_FORMAT", "needs an 'id' and a 'file_name'", where)
            continue
        stem = tile_stem(image["file_name"])
        if image["id"] in by_id:
            notes.add(ERROR, "BAD_FORMAT", f"image id {image['id']!r} is used twice", where)
        elif stem in entries:
            notes.add(
                ERROR,
                "BAD_FORMAT",
                f"{image['file_name']!r} has the same tile name as "
                f"{entries[stem].name!r}; tiles are matched by file stem",
                where,
            )
        else:
            by_id[image["id"]] = stem
            entries[stem] = Entry(image["file_name"], _declared_size(image), [])
    return by_id, entries


def load_coco(doc: Any, classes: Mapping[str, int]) -> AnnotationCollection:
    """A COCO document, its annotations grouped by the tile their image names."""
    if not (
        isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories"))
    ):
        raise InvalidParameterError("annotations", "a COCO file needs 'images', 'annotations' and 'categories' lists")
    notes = Notes("")
    categories = _coco_categories(doc["categories"], notes)
    by_id, entries = _coco_images(doc["images"], notes)
    for index, annotation in enumerate(doc["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        stem = by_id.get(image_id) if _hashable_id(image_id) else None
        if stem is None:
            notes.add(
                WARNING, "UNMATCHED_ANNOTATION", "image_id is not in 'images'; ignored", _coco_where(index, annotation)
            )
        else:
            entries[stem].items.append((index, annotation))
    return AnnotationCollection(
        "coco", classes, entries, notes.issues(), _coco_reader(categories), missing_unlabelled=True
    )
