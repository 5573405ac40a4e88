"""Unit tests for services.metrics_svc.charts: PNG size, colours, overlays, empty input."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from services.metrics_svc.charts import (
    TRAIN_COLOR,
    VAL_COLOR,
    EpochPoint,
    render_iou_chart,
    render_loss_chart,
)


def _points(n: int, offset: float = 0.0) -> list[EpochPoint]:
    return [
        EpochPoint(
            epoch=e,
            train_loss=1.0 / e + offset,
            val_loss=1.2 / e + 0.05 + offset,
            train_iou=1.0 - 0.8 / (e + 1) - offset,
            val_iou=0.95 - 0.8 / (e + 1) - offset,
        )
        for e in range(1, n + 1)
    ]


def _decode(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def _count_near(png: bytes, hex_color: str, tol: float = 40.0) -> int:
    rgb = np.asarray(_decode(png).convert("RGB")).astype(np.float64)
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)
    return int((np.linalg.norm(rgb - target, axis=2) < tol).sum())


@pytest.mark.parametrize("render", [render_loss_chart, render_iou_chart])
@pytest.mark.parametrize(("width", "height"), [(800, 480), (640, 360), (1023, 577), (160, 120)])
def test_png_has_exact_size(render: object, width: int, height: int) -> None:
    assert callable(render)
    png = render({"job-1": _points(10)}, width=width, height=height)
    assert _decode(png).size == (width, height)


def test_default_size() -> None:
    assert _decode(render_loss_chart({"job": _points(3)})).size == (800, 480)


def test_colour_constants_are_blue_and_red() -> None:
    r, g, b = (int(TRAIN_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert b > r + 80 and b > g + 80
    r, g, b = (int(VAL_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert r > g + 80 and r > b + 80


@pytest.mark.parametrize("render", [render_loss_chart, render_iou_chart])
def test_train_blue_and_val_red_pixels_present(render: object) -> None:
    assert callable(render)
    png = render({"job-1": _points(12)})
    assert _count_near(png, TRAIN_COLOR) > 200
    assert _count_near(png, VAL_COLOR) > 200


def test_overlay_of_two_jobs() -> None:
    single = render_loss_chart({"a": _points(8)})
    overlay = render_loss_chart({"a": _points(8), "b": _points(5, offset=0.3)})
    img = _decode(overlay)
    assert img.size == (800, 480)
    # The second job adds more blue and red line pixels.
    assert _count_near(overlay, TRAIN_COLOR) > _count_near(single, TRAIN_COLOR)
    assert _count_near(overlay, VAL_COLOR) > _count_near(single, VAL_COLOR)
    iou = render_iou_chart({"a": _points(8), "b": _points(5, offset=0.2)})
    assert _count_near(iou, TRAIN_COLOR) > 200 and _count_near(iou, VAL_COLOR) > 200


@pytest.mark.parametrize("render", [render_loss_chart, render_iou_chart])
@pytest.mark.parametrize("series", [{}, {"job-1": []}])
def test_empty_series_gives_valid_png(render: object, series: dict[str, list[EpochPoint]]) -> None:
    assert callable(render)
    png = render(series, width=400, height=300)
    img = _decode(png)
    assert img.size == (400, 300)
    # No curves drawn, but the placeholder text makes the image non-blank.
    assert _count_near(png, TRAIN_COLOR, tol=30) == 0
    assert np.asarray(img.convert("L")).min() < 128


def test_single_epoch_and_unsorted_and_non_finite_points() -> None:
    pts = _points(5)
    messy = [pts[3], pts[0], EpochPoint(3, math.inf, math.nan, math.nan, 0.5), pts[1]]
    for render in (render_loss_chart, render_iou_chart):
        assert _decode(render({"one": pts[:1]})).size == (800, 480)
        assert _decode(render({"messy": messy})).size == (800, 480)
    # A single epoch is still visible thanks to the markers.
    assert _count_near(render_loss_chart({"one": pts[:1]}), TRAIN_COLOR) > 5


def test_many_jobs_cycle_styles() -> None:
    series = {f"job-with-a-long-name-{i}": _points(6, offset=0.05 * i) for i in range(9)}
    assert _decode(render_iou_chart(series, width=320, height=200)).size == (320, 200)


@pytest.mark.parametrize(("width", "height"), [(0, 480), (800, 10), (100_000, 480)])
def test_rejects_unusable_sizes(width: int, height: int) -> None:
    with pytest.raises(ValueError):
        render_loss_chart({}, width=width, height=height)


def test_concurrent_rendering_from_threads() -> None:
    # The metrics service renders from a gRPC thread pool.
    def job(i: int) -> tuple[int, int]:
        png = (render_loss_chart if i % 2 else render_iou_chart)({f"j{i}": _points(5 + i)}, width=300 + i)
        return _decode(png).size

    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(job, range(8)))
    assert sizes == [(300 + i, 480) for i in range(8)]
