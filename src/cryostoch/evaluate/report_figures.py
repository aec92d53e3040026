"""The figures of report.html that describe the particles rather than the map: the
distribution of viewing directions, each particle's posterior confidence, class sizes and the
noise spectrum. Pure functions of arrays, each returning a matplotlib `Figure` (Agg canvas,
no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def direction_coordinates(rot_deg: np.ndarray, tilt_deg: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (radians) of the viewing directions of RELION's (rot, tilt):
    the direction (cos rot sin tilt, sin rot sin tilt, cos tilt); tilt 0 is the north pole."""
    rot = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    lon = np.angle(np.exp(1j * rot))  # wrapped into (-pi, pi]
    lat = np.pi / 2 - np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    return lon, lat


def direction_histogram(rot_deg: np.ndarray, tilt_deg: np.ndarray, n_lat: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of viewing directions in equal-area bins of the sphere: `n_lat` bands equally
    spaced in sin(latitude) times 2 `n_lat` longitude sectors (Lambert's cylindrical
    equal-area grid). Returns the longitude edges (2 n_lat + 1,), latitude edges (n_lat + 1,)
    in radians, and the counts (n_lat, 2 n_lat)."""
    lon, lat = direction_coordinates(rot_deg, tilt_deg)
    lon_edges = np.linspace(-np.pi, np.pi, 2 * n_lat + 1)
    sin_edges = np.linspace(-1.0, 1.0, n_lat + 1)
    counts, _, _ = np.histogram2d(np.sin(lat), lon, bins=(sin_edges, lon_edges))
    return lon_edges, np.arcsin(sin_edges), counts


def viewing_directions_figure(rot_deg: np.ndarray, tilt_deg: np.ndarray, *,
                              title: str = "viewing directions") -> Figure:
    """The particles' viewing directions on a Mollweide map of the sphere, counted in
    equal-area bins (`direction_histogram`, log colour scale), as RELION's and cryoSPARC's
    angular-distribution plots: an even spread looks even, empty bins are white."""
    from matplotlib.colors import LogNorm

    n = len(np.asarray(rot_deg))
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1, projection="mollweide")
    n_lat = int(np.clip(np.sqrt(n / 8), 6, 36))
    lon_edges, lat_edges, counts = direction_histogram(rot_deg, tilt_deg, n_lat)
    if n:
        mesh = ax.pcolormesh(lon_edges, lat_edges, np.ma.masked_equal(counts, 0),
                             cmap="viridis", norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)))
        fig.colorbar(mesh, ax=ax, shrink=0.7, label="particles per bin (equal areas)")
    ax.set_xlabel("rot (azimuth)")
    ax.set_ylabel("90 - tilt (elevation)")
    ax.tick_params(labelsize=7)
    # matplotlib writes the azimuth labels along the equator, inside the map, where the bins
    # hid them (seen in headless Chromium): every 60 degrees, on a white patch
    ax.set_xticks(np.deg2rad(np.arange(-120, 121, 60)))
    for label in ax.get_xticklabels():
        label.set_bbox({"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1})
    ax.grid(alpha=0.4)
    ax.set_title(f"{title} ({n} particles)", fontsize=10)
    return fig


def confidence_figure(probability: np.ndarray) -> Figure:
    """Histogram of each particle's posterior probability of its most probable pose
    (rlnMaxValueProbDistribution): near 1 the pose is certain, near 0 it is spread out."""
    p = np.asarray(probability, dtype=np.float64)
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(p[np.isfinite(p)], bins=np.linspace(0.0, 1.0, 41), color="tab:blue")
    if len(p):
        median = float(np.median(p))
        ax.axvline(median, color="tab:orange", ls="--", lw=1,
                   label=f"median {median:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("posterior probability of the best pose (rlnMaxValueProbDistribution)")
    ax.set_ylabel("particles")
    ax.grid(alpha=0.3)
    return fig


def class_sizes_figure(sizes: Sequence[int], labels: Sequence[str]) -> Figure:
    """Bar chart of the particles assigned to each class."""
    fig = _figure(1.2 + 0.7 * len(sizes), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    total = max(sum(sizes), 1)
    bars = ax.bar(list(labels), list(sizes), color="tab:blue")
    ax.bar_label(bars, labels=[f"{100 * s / total:.0f}%" for s in sizes], fontsize=8)
    ax.set_ylabel("particles")
    ax.margins(y=0.15)
    return fig


def noise_spectrum_figure(variance: np.ndarray, box_size: int, pixel_size_a: float) -> Figure:
    """The noise variance per Fourier shell (one line per optics group, (G, S) or (S,))
    against spatial frequency (shell k at k / (N p) 1/A)."""
    from cryostoch.evaluate.plots import log_axis

    values = np.atleast_2d(np.asarray(variance, dtype=np.float64))
    frequency = np.arange(values.shape[1]) / (box_size * pixel_size_a)
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for g, row in enumerate(values):
        label = f"optics group {g + 1}" if len(values) > 1 else None
        ax.plot(frequency[1:], row[1:], lw=1, label=label)
    if np.all(values[:, 1:] > 0):
        log_axis(ax, "y")
    if len(values) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("noise variance sigma^2 per shell")
    ax.grid(alpha=0.3)
    return fig


__all__ = ["class_sizes_figure", "confidence_figure", "direction_coordinates",
           "direction_histogram", "noise_spectrum_figure", "viewing_directions_figure"]
