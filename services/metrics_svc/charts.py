"""Loss and IoU charts as PNG bytes, rendered by the metrics service.

This module owns how training curves look: train in blue, validation in red,
epochs on an integer x axis, one line style/marker per job when several jobs
are overlaid, and a "no epochs yet" placeholder for empty input.

matplotlib is imported lazily, on the first render (see ``_matplotlib``):
importing it costs ~0.3 s, which processes that merely import this module
(service start-up, CLI, unrelated tests) should not pay. Only the
object-oriented API with an explicit Agg canvas is used, never pyplot, so no
global figure state is shared between the gRPC server's threads.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["TRAIN_COLOR", "VAL_COLOR", "EpochPoint", "render_iou_chart", "render_loss_chart"]

TRAIN_COLOR = "#1f4fd8"  # blue
VAL_COLOR = "#d62728"  # red

_DPI = 100
# Below ~160x120 px the title, labels and legend no longer fit and the
# constrained layout gives up (warning, overlapping text), so refuse such sizes.
_MIN_WIDTH, _MIN_HEIGHT, _MAX_PX = 160, 120, 8000
# One (line style, marker) per overlaid job; colours stay train-blue/val-red.
_JOB_STYLES: tuple[tuple[Any, str], ...] = (
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (6, 2, 1, 2, 1, 2)), "v"),
    ((0, (1, 1)), "P"),
)
_MAX_MARKERS = 20  # beyond this many epochs, mark only every n-th point

# matplotlib does not promise thread safety even for separate figures (shared
# font/text caches), so renders are serialised. A chart takes tens of ms.
_RENDER_LOCK = threading.Lock()


@dataclass(frozen=True)
class EpochPoint:
    """Metrics of one finished epoch of one training job."""

    epoch: int
    train_loss: float
    val_loss: float
    train_iou: float
    val_iou: float


@dataclass(frozen=True)
class _ChartSpec:
    """What distinguishes the loss chart from the IoU chart."""

    title: str
    ylabel: str
    train: Callable[[EpochPoint], float]
    val: Callable[[EpochPoint], float]
    y_limits: tuple[float, float] | None  # None: autoscale (bottom pinned at 0 if possible)
    legend_loc: Literal["upper right", "lower right"]  # where curves rarely are


_LOSS = _ChartSpec("Loss", "Loss", lambda p: p.train_loss, lambda p: p.val_loss, None, "upper right")
_IOU = _ChartSpec("IoU", "Mean IoU", lambda p: p.train_iou, lambda p: p.val_iou, (0.0, 1.0), "lower right")


def render_loss_chart(
    series: Mapping[str, Sequence[EpochPoint]], *, width: int = 800, height: int = 480
) -> bytes:
    """PNG of train/val loss per epoch for each job in ``series``; exactly width x height px."""
    return _render(series, _LOSS, width, height)


def render_iou_chart(
    series: Mapping[str, Sequence[EpochPoint]], *, width: int = 800, height: int = 480
) -> bytes:
    """PNG of train/val mean IoU per epoch (y axis 0..1); exactly width x height px."""
    return _render(series, _IOU, width, height)


@cache
def _matplotlib() -> tuple[Any, Any, Any]:
    """Import the matplotlib pieces on first use (see module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    return Figure, FigureCanvasAgg, MaxNLocator


def _render(series: Mapping[str, Sequence[EpochPoint]], spec: _ChartSpec, width: int, height: int) -> bytes:
    """Draw one chart and encode it as PNG of exactly ``width`` x ``height``."""
    for name, value, low in (("width", width, _MIN_WIDTH), ("height", height, _MIN_HEIGHT)):
        if not low <= value <= _MAX_PX:
            raise ValueError(f"{name} must be in {low}..{_MAX_PX} px, got {value}")
    jobs = [(str(label), _sorted_points(points)) for label, points in series.items()]
    jobs = [(label, points) for label, points in jobs if points]
    figure_cls, canvas_cls, locator_cls = _matplotlib()

    with _RENDER_LOCK:
        # figsize * dpi == pixel size; no bbox_inches="tight", which would
        # crop/grow the canvas. The constrained layout only moves the axes.
        fig = figure_cls(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
        canvas_cls(fig)  # attaches the Agg canvas to the figure explicitly
        ax = fig.add_subplot()
        ax.set_title(spec.title)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(spec.ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(locator_cls(integer=True))
        if jobs:
            _draw_jobs(ax, jobs, spec)
        else:
            ax.text(0.5, 0.5, "no epochs yet", transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_xticks([])  # no epochs: integer ticks 0/1 would be misleading
        if spec.y_limits is not None:
            ax.set_ylim(*spec.y_limits)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _draw_jobs(ax: Axes, jobs: Sequence[tuple[str, list[EpochPoint]]], spec: _ChartSpec) -> None:
    """Plot train (blue) and val (red) per job; jobs differ by line style/marker."""
    single = len(jobs) == 1
    all_values: list[float] = []
    for idx, (label, points) in enumerate(jobs):
        linestyle, marker = _JOB_STYLES[idx % len(_JOB_STYLES)]
        epochs = [p.epoch for p in points]
        markevery = max(1, math.ceil(len(points) / _MAX_MARKERS))
        for kind, color, getter in (("train", TRAIN_COLOR, spec.train), ("val", VAL_COLOR, spec.val)):
            values = [_finite_or_nan(getter(p)) for p in points]
            all_values.extend(v for v in values if not math.isnan(v))
            ax.plot(
                epochs,
                values,
                color=color,
                linestyle=linestyle,
                marker=marker,
                markersize=4,
                markevery=markevery,
                linewidth=2,
                # One job: short labels with the job as legend title.
                label=kind if single else f"{label} {kind}",
            )
    if spec.y_limits is None and all_values and min(all_values) >= 0:
        ax.set_ylim(bottom=0)  # losses are non-negative: anchor the scale at 0
    legend = ax.legend(
        loc=spec.legend_loc,
        title=jobs[0][0] if single and jobs[0][0] else None,
        fontsize="small",
        ncols=1 if len(jobs) <= 3 else 2,
        framealpha=0.85,
    )
    # The legend sits inside the axes; if many long job labels make it larger
    # than a small chart, let it overflow rather than collapse the layout.
    legend.set_in_layout(False)


def _sorted_points(points: Sequence[EpochPoint]) -> list[EpochPoint]:
    """Points ordered by epoch, so out-of-order reports still draw a clean line."""
    return sorted(points, key=lambda p: p.epoch)


def _finite_or_nan(value: float) -> float:
    """NaN for missing/diverged values: matplotlib leaves a gap instead of
    breaking autoscaling on inf."""
    value = float(value)
    return value if math.isfinite(value) else math.nan
