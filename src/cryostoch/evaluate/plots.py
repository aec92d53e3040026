"""Figures: the reconstruction report and map views (matplotlib, Agg backend, no display).

Every log axis goes through `log_axis`: labelled major ticks spaced so that their labels never
overlap (matplotlib's default labels the 2..9 minor ticks when an axis spans one or two
decades, which crowds them into each other), minor ticks unlabelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# Centre-to-centre spacing of two tick labels, in font sizes (ems) along the axis: a label
# such as 3x10^-2 is 4.3 em wide at most, a power of ten 2.4 em; on a y axis a label is 1.2 em
# high. Half of each neighbour plus a margin.
_LABEL_GAP_EM = {"x": {"powers": 3.0, "mantissas": 5.0}, "y": {"powers": 2.0, "mantissas": 2.0}}
_MANTISSAS = ((1.0, 2.0, 5.0), (1.0, 3.0))
REPORT_DPI = 90


def _spaced_log_locator():
    """A matplotlib Locator (class made on first use: matplotlib is imported lazily)."""
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties
    from matplotlib.ticker import Locator

    class SpacedLogLocator(Locator):
        """Major ticks of a base-10 log axis, far enough apart on the axis for their labels:
        powers of ten (every k-th when the decades are narrow) while at least two are in
        view, else 1-2-5 (or 1-3) x 10^k if those fit, else the spaced powers of ten."""

        def __call__(self):
            vmin, vmax = self.axis.get_view_interval()
            return self.tick_values(vmin, vmax)

        def _points_per_decade(self, decades: float) -> tuple[float, str]:
            name = self.axis.axis_name
            axes = self.axis.axes
            corner = [[1, 0]] if name == "x" else [[0, 1]]
            ends = axes.transAxes.transform([[0, 0], *corner])
            length_px = float(np.abs(ends[1] - ends[0]).max())
            length_pt = length_px / axes.figure.dpi * 72.0
            return length_pt / max(decades, 1e-12), name

        def tick_values(self, vmin, vmax):
            vmin, vmax = sorted((float(vmin), float(vmax)))
            if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= 0:
                return np.array([1.0, 10.0])
            vmin = max(vmin, vmax * 1e-300)
            lo, hi = math.log10(vmin), math.log10(vmax)
            per_decade, name = self._points_per_decade(hi - lo)
            size = FontProperties(size=mpl.rcParams[f"{name}tick.labelsize"]).get_size_in_points()
            first, last = math.floor(lo) - 1, math.ceil(hi) + 1
            gap = _LABEL_GAP_EM.get(name, _LABEL_GAP_EM["x"])
            stride = max(1, math.ceil(gap["powers"] * size / per_decade))
            powers = [k for k in range(first - stride, last + stride + 1) if k % stride == 0]
            in_view = [k for k in powers if lo - 1e-9 <= k <= hi + 1e-9]
            if len(in_view) >= 2:
                return np.array([10.0**k for k in powers])
            for mantissas in _MANTISSAS:
                steps = np.diff(np.log10([*mantissas, 10.0]))
                if float(steps.min()) * per_decade >= gap["mantissas"] * size:
                    return np.array([m * 10.0**k for k in range(first, last + 1)
                                     for m in mantissas])
            return np.array([10.0**k for k in powers])  # one label (or none) in view

    return SpacedLogLocator()


def log_axis(ax: Axes, which: str = "x") -> None:
    """Put the x (or y) axis of `ax` on a log scale whose tick labels do not overlap:
    `SpacedLogLocator` major ticks, all labelled (10^k and m x 10^k), minor ticks unlabelled."""
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    if which not in ("x", "y"):
        raise ValueError(f"which must be 'x' or 'y', got {which!r}")
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(_spaced_log_locator())
    # minor_thresholds (inf, inf): every major tick labelled, whatever the span
    axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False,
                                                     minor_thresholds=(math.inf, math.inf)))
    axis.set_minor_formatter(NullFormatter())


def map_views(volume: Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Central slices and projections along z, y and x (as 2-D arrays, [row, column])."""
    v = volume.detach().float().cpu()
    c = v.shape[0] // 2
    slices = [v[c].numpy(), v[:, c].numpy(), v[:, :, c].numpy()]
    projections = [v.sum(0).numpy(), v.sum(1).numpy(), v.sum(2).numpy()]
    return slices, projections


def reconstruction_report(
    path: Path | str,
    volume: Tensor,
    metrics: Sequence[dict],
    *,
    title: str = "",
) -> None:
    """PNG: held-out NLL against gradient evaluations, then central slices and projections
    (`report_figure`)."""
    plt = _pyplot()
    fig = report_figure(volume, metrics, title=title)
    fig.savefig(path, dpi=REPORT_DPI)
    plt.close(fig)


def report_figure(volume: Tensor, metrics: Sequence[dict], *, title: str = "") -> Figure:
    """The figure of `reconstruction_report` (pyplot's: close it with `plt.close`)."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 4)
    plot_test_nll(fig.add_subplot(grid[0, :2]), metrics, title=title)
    plot_objective(fig.add_subplot(grid[1, :2]), metrics)
    draw_map_views(fig, grid[:, 2:], volume)
    return fig


def plot_test_nll(ax: Axes, metrics: Sequence[dict], *, title: str = "") -> None:
    """Held-out NLL per image against gradient evaluations (metrics.csv rows)."""
    points = [(m["gradient_evaluations"], m["test_nll"]) for m in metrics
              if m.get("test_nll") is not None]
    if points:
        x, y = zip(*points, strict=True)
        ax.plot(np.maximum(np.asarray(x, dtype=float), 1), y, marker=".", lw=1)
        log_axis(ax)
    ax.set_xlabel("gradient evaluations (single images)")
    ax.set_ylabel("held-out negative log-likelihood per image")
    ax.set_title(title or "test NLL")
    ax.grid(alpha=0.3)


def plot_objective(ax: Axes, metrics: Sequence[dict]) -> None:
    """The minibatch objective against gradient evaluations, with the frequency-marching
    stage changes marked (dashed, labelled with the new cutoff)."""
    objective = [(m["gradient_evaluations"], m["minibatch_objective"]) for m in metrics
                 if m.get("minibatch_objective") is not None]
    if objective:
        x, y = zip(*objective, strict=True)
        ax.plot(np.maximum(np.asarray(x, dtype=float), 1), y, lw=0.6, color="tab:gray")
        log_axis(ax)
    stages = [(m["gradient_evaluations"], m.get("cutoff_resolution_a")) for m in metrics]
    for (_, before), (x, after) in zip(stages, stages[1:], strict=False):
        if before is not None and after is not None and before != after:
            ax.axvline(max(x, 1), color="tab:orange", lw=0.8, ls="--")
            ax.annotate(f"{after:.0f} A", (max(x, 1), 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", fontsize=7,
                        color="tab:orange", va="top")
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("minibatch objective (at the stage's cutoff)")
    ax.grid(alpha=0.3)


def draw_map_views(fig: Figure, spec, volume: Tensor) -> None:
    """Central slices (top row) and projections (bottom row) along z, y and x in the
    gridspec cell `spec` of `fig`."""
    slices, projections = map_views(volume)
    names = ["z", "y", "x"]
    small = spec.subgridspec(2, 3)
    for i in range(3):
        a = fig.add_subplot(small[0, i])
        a.imshow(slices[i], cmap="gray", origin="lower")
        a.set_title(f"central slice {names[i]}", fontsize=9)
        a.axis("off")
        b = fig.add_subplot(small[1, i])
        b.imshow(projections[i], cmap="gray", origin="lower")
        b.set_title(f"projection along {names[i]}", fontsize=9)
        b.axis("off")


def _agg_figure(width: float, height: float) -> Figure:
    """A figure outside pyplot (nothing to close), drawn by Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def convergence_figure(metrics: Sequence[dict], *, title: str = "") -> Figure:
    """The curves of the report: held-out NLL and the minibatch objective (with the stage
    changes) against gradient evaluations, side by side."""
    fig = _agg_figure(11, 3.8)
    grid = fig.add_gridspec(1, 2)
    plot_test_nll(fig.add_subplot(grid[0, 0]), metrics, title=title)
    plot_objective(fig.add_subplot(grid[0, 1]), metrics)
    return fig


def map_views_figure(volume: Tensor) -> Figure:
    """Central slices and projections of the map (N, N, N) along z, y and x."""
    fig = _agg_figure(7.5, 5.2)
    draw_map_views(fig, fig.add_gridspec(1, 1)[0, 0], volume)
    return fig


PROJECTION_AXES = "zyx"  # the order of map_views' projections


def projection_gallery_figure(
    rows: Sequence[Sequence[Tensor | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    reference: Tensor | None = None,
    reference_label: str = "truth",
    panel_inches: float = 1.1,
) -> Figure:
    """Maps as projections along z, y and x: one row per entry of `rows` (each a sequence of
    (N, N, N) maps or None, one per column label), each column a group of three panels; with
    `reference`, a first row holding it in every group, so that every map sits under the
    map it should resemble. One central slice cannot tell an elongated molecule from a dot
    seen end-on: three projections can. Each panel is scaled to its own range. The figure has
    (len(rows) + [reference given]) x len(column_labels) x 3 axes, row by row, group by group,
    in the order z, y, x."""
    labelled = ([(reference_label, [reference] * len(column_labels))] if reference is not None
                else []) + list(zip(row_labels, rows, strict=True))
    n_views = len(PROJECTION_AXES)
    # fixed positions in inches (no layout engine): every panel the same size, whatever the
    # titles above the first row
    left, top, gap, pad = 0.3, 0.45, 0.15, 0.03
    width = left + len(column_labels) * (n_views * panel_inches + gap)
    height = top + len(labelled) * panel_inches + pad
    fig = _agg_figure(width, height)
    fig.set_layout_engine(None)
    for r, (label, maps) in enumerate(labelled):
        bottom = height - top - (r + 1) * panel_inches
        for c, volume in enumerate(maps):
            projections = map_views(volume)[1] if volume is not None else [None] * n_views
            for k, image in enumerate(projections):
                x0 = left + c * (n_views * panel_inches + gap) + k * panel_inches
                side = panel_inches - pad  # square panels, `pad` apart
                ax = fig.add_axes((x0 / width, bottom / height, side / width, side / height))
                ax.set_xticks([])
                ax.set_yticks([])
                if image is not None:
                    ax.imshow(image, cmap="gray", origin="lower", aspect="auto")
                if r == 0:
                    view = f"along {PROJECTION_AXES[k]}"
                    ax.set_title(f"{column_labels[c]}\n{view}" if k == 1 else view,
                                 fontsize=8)
                if c == 0 and k == 0:
                    ax.set_ylabel(label, fontsize=8)
    return fig


def nll_figure(runs: Sequence, title: str):
    """The paper study's Fig. 3: held-out NLL of every run (objects with `.name` and
    `.metrics`, rows with gradient_evaluations and test_nll) against gradient evaluations, and
    a zoom on the end of the paper-faithful runs (a pyplot figure: close it with
    `plt.close`)."""
    plt = _pyplot()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    finals = []
    for run in runs:
        points = [(m["gradient_evaluations"], m["test_nll"]) for m in run.metrics
                  if m.get("test_nll") is not None]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        style = "--" if run.name in ("projmatch", "em") else "-"
        for a in (ax, zoom):
            a.plot([max(v, 1) for v in x], y, style, marker=".", ms=3, lw=1.2, label=run.name)
        if run.name == "cryostoch":
            # its coloured noise model puts its NLL on another scale (40 units lower on the
            # real particles): the zoom would show it alone
            continue
        finals.append(y[-1])
        tail = [v for v, g in zip(y, x, strict=True) if g >= 0.5 * x[-1]]
        finals.extend(tail)
    log_axis(ax)
    ax.set_xlabel("gradient evaluations (single images)")
    ax.set_ylabel("held-out negative log-likelihood per image")
    ax.set_title(title)
    ax.legend(fontsize=8)
    log_axis(zoom)
    if finals:
        low = min(finals)
        zoom.set_ylim(low - 1, low + 15)
        xmax = max(m["gradient_evaluations"] for r in runs for m in r.metrics)
        zoom.set_xlim(max(1, xmax / 10), xmax * 1.1)
    zoom.set_title("zoom on the end")
    zoom.set_xlabel("gradient evaluations")
    for a in (ax, zoom):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig
