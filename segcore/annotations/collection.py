"""Single annotation files covering many tiles, rendered one tile at a time.

This module owns ``AnnotationCollection`` and how a collection file's images are
matched to tiles: by file stem (``tile_stem``), exactly and case-sensitively.
The format modules (``coco``, ``geojson``) parse a file into one ``Entry`` per
image plus a ``Reader`` that turns an entry's raw items into shapes; parsing is
done once, painting is done per tile on request, so a service can render and
check tiles one by one without holding every mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from segcore.annotations.canvas import Canvas, Shape, paint_all
from segcore.annotations.issues import ERROR, WARNING, AnnotationIssue, Notes, Rendered, finish, not_annotated
from segcore.annotations.params import check_size

# (raw items of one image, tile width, tile height, where to note problems) -> shapes in file order
Reader = Callable[[list[tuple[int, Any]], int, int, Notes], Iterator[Shape]]


def tile_stem(name: str) -> str:
    """The tile name for a file name as annotation files write it (any folder, either slash)."""
    return PurePosixPath(name.replace("\\", "/")).stem


@dataclass
class Entry:
    """One image of a collection file."""

    name: str  # the file name as the annotation file writes it
    size: tuple[int, int] | None  # (width, height) the file declares, checked against the tile
    items: list[tuple[int, Any]]  # (position in the file, raw annotation or feature)


class AnnotationCollection:
    """The annotations of many tiles from one file (COCO JSON, multi-tile GeoJSON), rendered per tile.

    ``issues`` holds problems of the file itself (tile ""); tiles are matched by
    file stem (``tile_stem``), exactly and case-sensitively.
    """

    def __init__(
        self,
        fmt: str,
        classes: Mapping[str, int],
        entries: dict[str, Entry],
        issues: list[AnnotationIssue],
        reader: Reader,
        *,
        missing_unlabelled: bool,
    ) -> None:
        self.format = fmt
        self.issues = issues
        self._classes = dict(classes)
        self._entries = entries
        self._reader = reader
        # COCO lists its images, so a tile it does not list was never annotated (unlabelled);
        # a GeoJSON file cannot list an image without features, so there absence means "empty".
        self._missing_unlabelled = missing_unlabelled

    @property
    def tiles(self) -> list[str]:
        """Tile names (file stems) the file has an entry for."""
        return sorted(self._entries)

    def render(self, *, tile: str, width: int, height: int) -> Rendered:
        """The mask of ``tile`` (an image file stem) of ``width`` x ``height`` pixels."""
        check_size(width, height)
        entry = self._entries.get(tile)
        if entry is None and self._missing_unlabelled:
            return not_annotated(tile, width, height, f"the {self.format} file does not list this tile")
        notes = Notes(tile)
        canvas = Canvas(width, height, self._classes, notes)
        if entry is None:
            return finish(canvas.mask, notes)
        if entry.size is not None and entry.size != (width, height):
            w, h = entry.size
            notes.add(
                ERROR,
                "SIZE_MISMATCH",
                f"the annotation file gives {entry.name!r} as {w}x{h} pixels but the tile is {width}x{height}",
            )
        return paint_all(self._reader(entry.items, width, height, notes), canvas)

    def unmatched(self, tiles: Iterable[str]) -> list[AnnotationIssue]:
        """Warnings for annotated images of the file that are not among ``tiles`` (file stems)."""
        present = set(tiles)
        return [
            AnnotationIssue(
                WARNING,
                "UNMATCHED_ANNOTATION",
                stem,
                f"{entry.name!r} has {len(entry.items)} annotation(s) but no tile is named {stem!r}; they are ignored",
            )
            for stem, entry in sorted(self._entries.items())
            if entry.items and stem not in present
        ]
