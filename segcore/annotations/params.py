"""Checks of the caller's arguments and JSON decoding: the failures that raise instead of reporting.

Problems inside an annotation file become issues (see ``issues``); what this
module rejects is different in kind: a bad class list or tile size is the
caller's mistake (``InvalidParameterError``), and bytes that are not JSON at
all leave nothing to report issues about, so they raise whatever error the
caller supplies (``InvalidTileError`` for a per-tile file,
``InvalidParameterError("annotations", ...)`` for a collection file).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from segcore import limits
from segcore.annotations.issues import UNLABELLED
from segcore.errors import InvalidParameterError


def class_index(class_names: Sequence[str]) -> dict[str, int]:
    """Class name -> mask value, after checking the names fit a ``uint8`` mask."""
    names = list(class_names)
    if not names:
        raise InvalidParameterError("class_names", "at least one class is needed")
    if len(names) > UNLABELLED:
        raise InvalidParameterError("class_names", "at most 255 classes fit a uint8 mask next to 255 (unlabelled)")
    if any(not isinstance(name, str) or not name for name in names):
        raise InvalidParameterError("class_names", "class names must be non-empty strings")
    if len(set(names)) != len(names):
        raise InvalidParameterError("class_names", "class names must be unique")
    return {name: index for index, name in enumerate(names)}


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidParameterError("size", f"tile size must be positive, got {width}x{height}")


def parse_json(data: bytes, fail: Callable[[str], Exception]) -> Any:
    """The JSON document in ``data``, within the size and nesting limits (segcore.limits);
    ``fail(reason)`` builds the exception raised otherwise."""
    if not data:
        raise fail("file is empty")
    if len(data) > limits.MAX_JSON_BYTES:
        raise fail(f"the file holds {len(data):,} bytes; at most {limits.MAX_JSON_BYTES:,}")
    try:
        # utf-8-sig: Windows tools often write a byte-order mark that json.loads rejects.
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc}") from exc
    except RecursionError:  # deeper than the interpreter's stack allows
        raise fail(f"arrays and objects are nested more than {limits.MAX_JSON_DEPTH} deep") from None
    if _depth_over(doc, limits.MAX_JSON_DEPTH):
        raise fail(f"arrays and objects are nested more than {limits.MAX_JSON_DEPTH} deep")
    return doc


def _depth_over(doc: Any, most: int) -> bool:
    """Whether containers nest deeper than `most` in `doc`: level by level, each value looked at
    once, without recursion."""
    level: list[Any] = [doc]
    for _ in range(most):
        deeper: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            deeper.extend(c for c in children if isinstance(c, (list, dict)))
        if not deeper:
            return False
        level = deeper
    return True
