"""Django-Labeller per-image JSON: labels to shapes, following the tool's own renderer.

This module owns the reading of Django-Labeller files (an object with a
``labels`` list, or the bare list): ``polygon`` labels (``regions``, or
``vertices`` in older files; regions are XOR-ed, so a region inside another is
a hole), ``box``, ``oriented_ellipse`` and ``group`` labels (a classified group
paints its members in its own class). Point and line labels have no area and
are skipped with a warning; ``composite`` labels only refer to other labels,
which are painted on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from segcore.annotations.canvas import Shape, to_ring
from segcore.annotations.issues import ERROR, WARNING, Notes, Skip
from segcore.errors import InvalidTileError

_NO_AREA_LABELS = ("point", "polyline", "line")


def _xy(point: Any) -> tuple[Any, Any]:
    return point["x"], point["y"]


def _labeller_polygon(label: Mapping[str, Any]) -> list[np.ndarray]:
    # Older Django-Labeller files store a single region as 'vertices'.
    regions = [label["vertices"]] if "vertices" in label else label.get("regions")
    if not isinstance(regions, list) or not all(isinstance(region, list) for region in regions):
        raise Skip(ERROR, "BAD_FORMAT", "polygon label needs 'regions': a list of lists of {x, y} points")
    return [to_ring(_xy(point) for point in region) for region in regions]


def _labeller_box(label: Mapping[str, Any]) -> list[np.ndarray]:
    try:
        (cx, cy), (sx, sy) = _xy(label["centre"]), _xy(label["size"])
        cx, cy, hx, hy = float(cx), float(cy), abs(float(sx)) / 2, abs(float(sy)) / 2
    except (KeyError, TypeError, ValueError) as exc:
        raise Skip(ERROR, "BAD_FORMAT", f"box label needs 'centre' and 'size' as {{x, y}} ({exc})") from exc
    return [to_ring([(cx - hx, cy - hy), (cx + hx, cy - hy), (cx + hx, cy + hy), (cx - hx, cy + hy)])]


def _labeller_ellipse(label: Mapping[str, Any]) -> list[np.ndarray]:
    """An oriented ellipse as a polygon with about one vertex per pixel of perimeter (as the tool draws it)."""
    try:
        cx, cy = (float(v) for v in _xy(label["centre"]))
        r1, r2 = abs(float(label["radius1"])), abs(float(label["radius2"]))
        angle = float(label["orientation_radians"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Skip(ERROR, "BAD_FORMAT", f"oriented_ellipse label needs centre, radii and orientation ({exc})") from exc
    if not all(math.isfinite(v) for v in (r1, r2, angle)):
        raise Skip(ERROR, "BAD_FORMAT", "oriented_ellipse has a NaN or infinite parameter")
    theta = np.linspace(0.0, 2.0 * math.pi, max(16, math.ceil(2.0 * math.pi * max(r1, r2))), endpoint=False)
    u, v = r1 * np.cos(theta), r2 * np.sin(theta)
    x = cx + u * math.cos(angle) - v * math.sin(angle)
    y = cy + u * math.sin(angle) + v * math.cos(angle)
    return [to_ring(zip(x, y, strict=True))]


def _labeller_label(label: Any, where: str, notes: Notes, group_class: str | None) -> Iterator[Shape]:
    if not isinstance(label, dict):
        raise Skip(ERROR, "BAD_FORMAT", "is not a label object")
    kind = label.get("label_type")
    # A classified group paints all its members in its own class, as Django-Labeller's
    # render_label_classes does; an unclassified group leaves each member its own class.
    label_class = group_class if group_class is not None else label.get("label_class")
    if kind == "polygon":
        # Regions are XOR-ed like the tool's renderer: a region inside another is a hole.
        yield Shape(where, label_class, [_labeller_polygon(label)], outline_first=False)
    elif kind == "box":
        yield Shape(where, label_class, [_labeller_box(label)])
    elif kind == "oriented_ellipse":
        yield Shape(where, label_class, [_labeller_ellipse(label)])
    elif kind == "group":
        members = label.get("component_models")
        if not isinstance(members, list):
            raise Skip(ERROR, "BAD_FORMAT", "group label needs a 'component_models' list")
        inherited = label_class if isinstance(label_class, str) and label_class.strip() else None
        yield from labeller_shapes(members, f"{where}.component_models", notes, inherited)
    elif kind in _NO_AREA_LABELS:
        raise Skip(WARNING, "UNSUPPORTED_GEOMETRY", f"is a {kind} label, which has no area; skipped")
    elif kind != "composite":  # a composite only refers to other labels, which are painted on their own
        raise Skip(ERROR, "BAD_FORMAT", f"unknown label_type {kind!r}")


def labeller_shapes(labels: list[Any], prefix: str, notes: Notes, group_class: str | None = None) -> Iterator[Shape]:
    """Shapes of ``labels`` (named ``prefix[i]`` in issues); unusable labels are noted and skipped."""
    for i, label in enumerate(labels):
        where = f"{prefix}[{i}]"
        try:
            yield from _labeller_label(label, where, notes, group_class)
        except Skip as skip:
            notes.add(skip.severity, skip.code, skip.detail, where)


def labeller_labels(doc: Any, tile: str) -> list[Any]:
    """The label list of a Django-Labeller document; raises InvalidTileError for any other structure."""
    labels = doc.get("labels") if isinstance(doc, dict) else doc
    if not isinstance(labels, list):
        raise InvalidTileError(
            tile, "expected Django-Labeller JSON: an object with a 'labels' list, or a list of labels"
        )
    return labels
