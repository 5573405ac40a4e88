"""Problem reports of annotation rendering: ``AnnotationIssue``, ``Rendered`` and issue merging.

This module owns how problems are reported. Every problem found inside an
annotation file becomes an ``AnnotationIssue`` naming its tile, never a log
line; severity ``error`` means the training set must be refused, ``warning`` is
stored with it.

Repeats of one problem in a tile are merged into one issue that lists where it
happens (``features[3]``, ``annotations[5] (id 17)``,
``labels[2].component_models[0]``: 0-based positions in the file), so a file
with 500 broken shapes gives one line per problem, naming at most
``_MAX_LISTED`` places.

It also owns the two mask outcomes every format shares: a tile nobody annotated
(all unlabelled, NOT_ANNOTATED) and the NO_ANNOTATIONS warning for a finished
mask without foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNLABELLED = 255
ERROR = "error"
WARNING = "warning"

_MAX_LISTED = 8  # places named in one merged issue before "and N more"


@dataclass(frozen=True)
class AnnotationIssue:
    """One problem found while rendering annotations.

    ``severity`` is "error" (the training set is refused) or "warning" (stored
    with the set); ``tile`` is the tile's name (image file stem), "" for a
    problem of the whole annotation file.
    """

    severity: str
    code: str
    tile: str
    message: str


@dataclass
class Rendered:
    """A tile's mask (``uint8`` ``height x width``, always the tile's size) and its issues."""

    mask: np.ndarray
    issues: list[AnnotationIssue]

    @property
    def has_errors(self) -> bool:
        return any(issue.severity == ERROR for issue in self.issues)


def short_list(items: Sequence[str]) -> str:
    """``items`` as one comma-separated list, cut after ``_MAX_LISTED`` with "and N more"."""
    shown = ", ".join(items[:_MAX_LISTED])
    extra = len(items) - _MAX_LISTED
    return f"{shown} and {extra} more" if extra > 0 else shown


class Notes:
    """Collects one tile's issues, merging repeats of the same problem into one issue."""

    def __init__(self, tile: str) -> None:
        self.tile = tile
        # Keyed by the whole problem, so only identical problems merge; dicts keep the order
        # problems were first seen, which is the order they are reported in. Each keeps the
        # first places it happens (a dict: constant time per repeat) and counts the rest.
        self._groups: dict[tuple[str, str, str], _Places] = {}

    def add(self, severity: str, code: str, detail: str, where: str = "") -> None:
        places = self._groups.get((severity, code, detail))
        if places is None:
            places = self._groups[(severity, code, detail)] = _Places()
        if where:
            places.add(where)

    def has_errors(self) -> bool:
        return any(severity == ERROR for severity, _, _ in self._groups)

    def issues(self) -> list[AnnotationIssue]:
        return [
            AnnotationIssue(severity, code, self.tile, f"{places}: {detail}" if places.named else detail)
            for (severity, code, detail), places in self._groups.items()
        ]


class _Places:
    """Where one problem happens: the first ``_MAX_LISTED`` distinct places, and how many more."""

    def __init__(self) -> None:
        self.named: dict[str, None] = {}
        self.more = 0

    def add(self, where: str) -> None:
        if where in self.named:
            return
        if len(self.named) < _MAX_LISTED:
            self.named[where] = None
        else:
            self.more += 1  # places past the listed ones are counted, not told apart

    def __str__(self) -> str:
        shown = ", ".join(self.named)
        return f"{shown} and {self.more} more" if self.more else shown


class Skip(Exception):
    """One annotation that cannot be used; carries the issue to report in its place.

    Raised deep inside a format's parsing and caught per annotation, so one bad
    shape is reported and skipped without costing the rest of the file.
    """

    def __init__(self, severity: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.severity = severity
        self.code = code
        self.detail = detail


def not_annotated(tile: str, width: int, height: int, why: str) -> Rendered:
    """The all-unlabelled mask of a tile without annotations, with a NOT_ANNOTATED warning."""
    # Unlabelled rather than background: nobody said these pixels hold no object.
    issue = AnnotationIssue(
        WARNING, "NOT_ANNOTATED", tile, f"{why}; every pixel is left unlabelled (255) and ignored by training"
    )
    return Rendered(np.full((height, width), UNLABELLED, np.uint8), [issue])


def finish(mask: np.ndarray, notes: Notes) -> Rendered:
    """A rendered tile: ``mask`` with the notes' issues, plus NO_ANNOTATIONS if it has no foreground."""
    # Only worth saying when nothing else is wrong: after an error the set is refused anyway.
    if not notes.has_errors() and not np.any((mask > 0) & (mask != UNLABELLED)):
        notes.add(WARNING, "NO_ANNOTATIONS", "no pixel of any foreground class; the tile trains as background only")
    return Rendered(mask, notes.issues())
