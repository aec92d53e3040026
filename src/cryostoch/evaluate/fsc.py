"""Fourier shell correlation between two maps, resolution estimates, plots and a report.

Shell `k` holds the Fourier coefficients whose rounded radius `|k|` (cycles per box) is `k`,
`k = 0 .. N // 2` (corners beyond N/2 are left out). The sums run over the rfft half-space with
each coefficient that has a distinct conjugate twin counted twice (`kx = 1 .. ceil(N/2) - 1`)
and the planes `kx = 0` and, for even N, `kx = N/2` counted once, which equals the sums over the
full transform (docs/conventions.md). Shell `k` has frequency `k / (N * pixel_size_a)` 1/A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cryostoch.fourier import radial_index, rfft3c
from cryostoch.io._common import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from cryostoch.evaluate.align import Alignment

__all__ = [
    "FscReport",
    "FscResult",
    "compute_fsc",
    "fourier_shell_correlation",
    "fsc_figure",
    "fsc_report",
    "half_space_weights",
    "plot_fsc",
    "shell_counts",
]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_pair(map_a: Tensor, map_b: Tensor) -> int:
    if map_a.dim() != 3 or tuple(map_a.shape) != (map_a.shape[0],) * 3:
        raise ValueError(f"maps must be cubic (N, N, N), got {tuple(map_a.shape)}")
    if tuple(map_b.shape) != tuple(map_a.shape):
        raise ValueError(
            f"maps differ in shape: {tuple(map_a.shape)} and {tuple(map_b.shape)}"
        )
    return int(map_a.shape[0])


def half_space_weights(n: int, *, dtype=torch.float64, device=None) -> Tensor:
    """`(n, n, n//2+1)` multiplicities of the `rfft3c` coefficients in full-space sums: 2 where
    the conjugate twin is not stored (`0 < kx < n/2`), else 1."""
    kx = torch.arange(n // 2 + 1, device=device)
    w = torch.where((kx > 0) & (2 * kx < n), 2.0, 1.0).to(dtype)
    return w.expand(n, n, n // 2 + 1)


def fourier_shell_correlation(
    map_a: Tensor, map_b: Tensor, *, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """FSC of two `(N, N, N)` maps on shells of integer radius `0 .. N // 2`.

    Returns `(shells, fsc)`: `(N//2 + 1,)` integer shell radii (cycles per box) and the FSC,
    `sum Re(A conj(B)) / sqrt(sum |A|^2 sum |B|^2)` per shell (0 where a map has no power in the
    shell), in float64 (float32 on MPS) on the maps' device. `mask`, if given, multiplies both
    maps in real space first (see `soft_sphere_mask`).
    """
    n = _check_pair(map_a, map_b)
    device = map_a.device
    acc = _accumulation_dtype(device)
    a = map_a.to(acc)
    b = map_b.to(device=device, dtype=acc)
    if mask is not None:
        mask = mask.to(device=device, dtype=acc)
        if tuple(mask.shape) != (n, n, n):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the maps")
        a, b = a * mask, b * mask
    fa, fb = rfft3c(a), rfft3c(b)
    shells = radial_index(n, half=True, ndim=3, device=device)
    weights = half_space_weights(n, dtype=acc, device=device)
    keep = shells <= n // 2
    index = shells[keep]
    w = weights[keep]
    size = n // 2 + 1

    def shell_sum(values: Tensor) -> Tensor:
        return torch.zeros(size, dtype=acc, device=device).index_add_(0, index, w * values[keep])

    cross = shell_sum((fa * fb.conj()).real)
    power_a = shell_sum(fa.abs().square())
    power_b = shell_sum(fb.abs().square())
    # a shell with no power beyond the round-off of the maps' own precision (a map low-passed
    # below it) counts as empty, not as a correlation of rounding errors
    coarsest = max(torch.finfo(m.dtype).eps if m.is_floating_point() else 0.0
                   for m in (map_a, map_b))
    floor = (4.0 * max(coarsest, torch.finfo(acc).eps)) ** 2
    empty = (power_a <= floor * power_a.sum()) | (power_b <= floor * power_b.sum())
    denom = torch.where(empty, 1.0, torch.sqrt(power_a * power_b))
    fsc = torch.where(empty, 0.0, cross / denom)
    return torch.arange(size, device=device), fsc


def shell_counts(n: int, *, device=None) -> Tensor:
    """Number of full-space Fourier coefficients in each shell `0 .. N // 2`."""
    shells = radial_index(n, half=True, ndim=3, device=device)
    weights = half_space_weights(n, device=device)
    keep = shells <= n // 2
    out = torch.zeros(n // 2 + 1, dtype=torch.float64, device=device)
    return out.index_add_(0, shells[keep], weights[keep]).round().long()


@dataclass(frozen=True)
class FscResult:
    """An FSC curve with its sampling: `fsc[k]` for shell `k` at `frequency_per_a[k]` 1/A.

    Tensors are float64 on the CPU. `resolution_at(threshold)` is the resolution (A) where the
    curve first falls below the threshold, by linear interpolation in frequency between the last
    shell at or above it and the first shell below it, searching from shell 1 (shell 0, the
    mean, is taken as 1). If the curve never falls below, it is the resolution of the last
    shell (Nyquist, `2 * pixel_size_a`, for even boxes) and `crosses(threshold)` is False.
    """

    frequency_per_a: Tensor  # (S,) 1/A
    fsc: Tensor  # (S,)
    box_size: int
    pixel_size_a: float

    @staticmethod
    def from_curve(fsc: Tensor, box_size: int, pixel_size_a: float) -> FscResult:
        fsc = torch.as_tensor(fsc).detach().to(device="cpu", dtype=torch.float64)
        shells = torch.arange(fsc.shape[0], dtype=torch.float64)
        return FscResult(shells / (box_size * pixel_size_a), fsc, int(box_size),
                         float(pixel_size_a))

    @property
    def shells(self) -> Tensor:
        return torch.arange(self.fsc.shape[0])

    @property
    def resolution_a(self) -> Tensor:
        """Resolution of each shell in A (`inf` for shell 0)."""
        return 1.0 / self.frequency_per_a

    @property
    def nyquist_a(self) -> float:
        return 2.0 * self.pixel_size_a

    def _crossing(self, threshold: float) -> float | None:
        """Frequency (1/A) of the first crossing below `threshold`, None if there is none."""
        f = self.frequency_per_a.tolist()
        c = self.fsc.tolist()
        if c:
            c[0] = 1.0
        for i in range(1, len(c)):
            if c[i] < threshold:
                prev, cur = c[i - 1], c[i]
                t = (prev - threshold) / (prev - cur) if prev != cur else 0.0
                return f[i - 1] + t * (f[i] - f[i - 1])
        return None

    def crosses(self, threshold: float) -> bool:
        return self._crossing(threshold) is not None

    def resolution_at(self, threshold: float) -> float:
        """Resolution in A at the first crossing below `threshold` (see the class docstring)."""
        freq = self._crossing(threshold)
        if freq is None:
            return float(1.0 / self.frequency_per_a[-1]) if len(self.fsc) > 1 else math.inf
        return 1.0 / freq if freq > 0 else math.inf

    @property
    def resolution_05(self) -> float:
        return self.resolution_at(0.5)

    @property
    def resolution_0143(self) -> float:
        return self.resolution_at(0.143)

    def describe_resolution(self, threshold: float) -> str:
        """E.g. `'8.42 A'`, or `'beyond Nyquist (4.00 A): the FSC never falls below 0.143'`."""
        value = self.resolution_at(threshold)
        if self.crosses(threshold):
            return f"{value:.2f} A"
        return f"beyond {value:.2f} A (Nyquist): the FSC never falls below {threshold:g}"

    def table(self) -> list[str]:
        """Lines of a table: shell, frequency (1/A), resolution (A), FSC (from shell 1)."""
        lines = [f"{'shell':>5}  {'freq (1/A)':>10}  {'res (A)':>8}  {'FSC':>7}"]
        for k in range(1, self.fsc.shape[0]):
            f = float(self.frequency_per_a[k])
            lines.append(f"{k:>5}  {f:>10.4f}  {1.0 / f:>8.2f}  {float(self.fsc[k]):>7.4f}")
        return lines


def compute_fsc(
    map_a: Tensor, map_b: Tensor, *, pixel_size_a: float, mask: Tensor | None = None
) -> FscResult:
    """`fourier_shell_correlation` wrapped with its sampling in an `FscResult`."""
    if not (math.isfinite(pixel_size_a) and pixel_size_a > 0):
        raise ValueError(f"pixel size must be positive, got {pixel_size_a!r}")
    _, fsc = fourier_shell_correlation(map_a, map_b, mask=mask)
    return FscResult.from_curve(fsc, map_a.shape[-1], pixel_size_a)


def plot_fsc(
    results: FscResult | Sequence[FscResult],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    thresholds: Sequence[float] = (0.5, 0.143),
    annotate: Sequence[bool] | None = None,
    resolution_ticks: bool = False,
) -> None:
    """Write a PNG of one or more FSC curves against frequency, with the thresholds marked
    (`fsc_figure`)."""
    fig = fsc_figure(results, labels=labels, title=title, thresholds=thresholds,
                     annotate=annotate, resolution_ticks=resolution_ticks)
    with atomic_path(path) as tmp:  # a failed write leaves no partial file behind
        fig.savefig(tmp, format="png")


def fsc_figure(
    results: FscResult | Sequence[FscResult],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    thresholds: Sequence[float] = (0.5, 0.143),
    annotate: Sequence[bool] | None = None,
    resolution_ticks: bool = False,
) -> Figure:
    """One or more FSC curves against frequency, with the thresholds marked.

    `annotate`: which curves get their threshold crossings marked (default: all).
    `resolution_ticks`: label the frequency axis (still linear in 1/A) in A.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if isinstance(results, FscResult):
        results = [results]
    labels = list(labels) if labels is not None else [None] * len(results)
    annotate = list(annotate) if annotate is not None else [True] * len(results)
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = ("--", ":", "-.")
    for res, label, marked in zip(results, labels, annotate, strict=True):
        f = res.frequency_per_a[1:].numpy()
        (line,) = ax.plot(f, res.fsc[1:].numpy(), label=label)
        for j, thr in enumerate(thresholds):
            if marked and res.crosses(thr):
                x = 1.0 / res.resolution_at(thr)
                ax.plot([x], [thr], "o", color=line.get_color(), ms=4)
                ax.annotate(f"{res.resolution_at(thr):.1f} A", (x, thr),
                            textcoords="offset points", xytext=(4, 4 - 12 * j), fontsize=8)
    for j, thr in enumerate(thresholds):
        ax.axhline(thr, color="grey", lw=0.8, ls=styles[j % len(styles)], label=f"FSC = {thr:g}")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("spatial frequency (1/A)")
    if resolution_ticks:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{1 / x:.3g}" if x > 0 else ""))
        ax.set_xlabel("resolution (A), axis linear in spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlim(0.0, max(float(r.frequency_per_a[-1]) for r in results))
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class FscReport:
    """What `fsc_report` computed: the curve, the alignment (if any), the map compared with
    map A (map B, aligned if asked), and printable lines."""

    fsc: FscResult
    alignment: Alignment | None
    compared_map: Tensor
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def fsc_report(
    map_a: Tensor,
    map_b: Tensor,
    *,
    pixel_size_a: float,
    align: bool = False,
    mask_radius_a: float | None = None,
    mask_edge_px: float = 5.0,
    resolution_a: float | None = None,
    plot_path: str | Path | None = None,
    aligned_path: str | Path | None = None,
    name_a: str = "map A",
    name_b: str = "map B",
    title: str | None = None,
    generator: torch.Generator | None = None,
) -> FscReport:
    """FSC between two maps, optionally after aligning B onto A (`align_maps`), with a text
    report (alignment, per-shell table, resolution at 0.5 and 0.143), an optional PNG of the
    curve (`plot_path`) and an optional MRC of the aligned map B (`aligned_path`).

    `mask_radius_a`: soft spherical mask (radius in A, cosine edge of `mask_edge_px` pixels)
    applied to both maps before the FSC. `resolution_a` is passed to `align_maps`.
    """
    n = _check_pair(map_a, map_b)
    lines: list[str] = [f"FSC between {name_a} and {name_b}: box {n}, pixel {pixel_size_a:.4g} A"]
    alignment = None
    compared = map_b
    if align:
        from cryostoch.evaluate.align import align_maps

        alignment = align_maps(map_a, map_b, pixel_size_a=pixel_size_a,
                               resolution_a=resolution_a, generator=generator)
        compared = alignment.apply(map_b)
        lines += [f"alignment of {name_b} onto {name_a}:", *alignment.describe(pixel_size_a)]
    mask = None
    if mask_radius_a is not None:
        from cryostoch.evaluate.transform import soft_sphere_mask

        mask = soft_sphere_mask(n, mask_radius_a / pixel_size_a, edge_px=mask_edge_px,
                                device=map_a.device)
        lines.append(f"mask: soft sphere of radius {mask_radius_a:g} A")
    result = compute_fsc(map_a, compared, pixel_size_a=pixel_size_a, mask=mask)
    lines += result.table()
    lines.append(f"resolution at FSC = 0.5:   {result.describe_resolution(0.5)}")
    lines.append(f"resolution at FSC = 0.143: {result.describe_resolution(0.143)}")
    if plot_path is not None:
        plot_fsc(result, plot_path, labels=[f"{name_a} vs {name_b}"], title=title)
    if aligned_path is not None:
        from cryostoch.io import write_map

        write_map(aligned_path, compared.detach().to("cpu", torch.float32), pixel_size_a)
    return FscReport(result, alignment, compared, tuple(lines))

