"""The files of a post-processing run (`write_postprocess`), apart from the numerics.

`evaluate` sits above `io` in the layering (DESIGN.md), as `evaluate.fsc` already writes its
plot and aligned map; the numerics stay file-free in `evaluate.postprocess`.

Written into the output folder: `fsc.csv`, `fsc.png`, `guinier.png`, `postprocess.json`,
`mask.mrc`, `map_unsharpened.mrc` and `map.mrc` (sharpened). Every file is first written under a
temporary name; only when all are complete are they renamed, the maps last and `map.mrc` at the
very end, so a failure leaves no output that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cryostoch.evaluate.fsc import fsc_figure, plot_fsc
from cryostoch.evaluate.postprocess import PostprocessResult
from cryostoch.io import write_map

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["OUTPUT_NAMES", "guinier_figure", "plot_guinier", "postprocess_fsc_figure",
           "postprocess_summary", "write_postprocess"]

# in the order they are renamed into place: the maps last, `map.mrc` at the very end
OUTPUT_NAMES = ("fsc.csv", "fsc.png", "guinier.png", "postprocess.json", "mask.mrc",
                "map_unsharpened.mrc", "map.mrc")
CURVES = ("unmasked", "masked", "randomized", "corrected")


def _finite_or_none(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def postprocess_summary(result: PostprocessResult, metadata: dict | None = None) -> dict:
    """What `postprocess.json` holds: resolutions (A), B-factor (A^2), mask, randomisation."""
    final = result.curve("final")
    fit = result.guinier
    summary = {
        "resolution_a": _finite_or_none(result.resolution_a),
        "resolution_0143_reached": final.crosses(0.143),
        "resolution_05_a": _finite_or_none(result.resolution_05_a),
        "fsc_used": result.final_curve_name,
        "mask_skipped": result.mask_skipped,
        "resolution_corrected_a": _finite_or_none(result.resolution_corrected_a),
        "resolution_unmasked_a": _finite_or_none(result.curve("unmasked").resolution_at(0.143)),
        "resolution_masked_a": _finite_or_none(result.curve("masked").resolution_at(0.143)),
        "bfactor_a2": round(result.bfactor, 3),
        "bfactor_source": {"none": "none (too few shells for a Guinier fit)"}.get(
            result.bfactor_source, result.bfactor_source),
        "guinier_fit": None if fit is None else {
            "from_a": round(fit.low_a, 3), "to_a": round(fit.high_a, 3),
            "shells": int(fit.fit_shells.sum()), "slope_a2": round(fit.slope, 4),
            "intercept": round(fit.intercept, 4), "correlation": round(fit.correlation, 4),
            "bfactor_a2": round(fit.bfactor, 3)},
        "mask": "auto" if result.mask_auto else "given",
        "mask_fraction": round(result.mask_fraction, 6),
        "randomize_at_a": round(result.randomize_at_a, 4),
        "randomize_beyond_shell": result.randomize_shell,
        "box_size": result.box_size,
        "pixel_size_a": result.pixel_size_a,
        "warnings": result.warnings,
    }
    summary.update(metadata or {})
    return summary


def _write_csv(result: PostprocessResult, path: Path) -> None:
    lines = ["shell,resolution_a," + ",".join(f"fsc_{name}" for name in CURVES)]
    frequency = result.frequency_per_a.tolist()
    curves = [getattr(result, f"fsc_{name}").tolist() for name in CURVES]
    for k, f in enumerate(frequency):
        resolution = f"{1.0 / f:.4f}" if f > 0 else "inf"
        lines.append(f"{k},{resolution}," + ",".join(f"{c[k]:.6f}" for c in curves))
    path.write_text("\n".join(lines) + "\n")


def plot_guinier(result: PostprocessResult, path: str | Path) -> None:
    """PNG of ln|F| against s^2 for the FSC-weighted and the sharpened map, with the fit."""
    guinier_figure(result).savefig(path, format="png")


def guinier_figure(result: PostprocessResult) -> Figure:
    """The figure of `plot_guinier`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    s2 = (result.frequency_per_a**2)[1:].numpy()
    ax.plot(s2, result.ln_amplitude_weighted[1:].numpy(), ".-", ms=3,
            label="FSC-weighted average")
    # dashed: with B = 0 (no sharpening) the two curves coincide and a solid line hid the first
    ax.plot(s2, result.ln_amplitude_sharpened[1:].numpy(), ".--", ms=3,
            label=f"sharpened, B = {result.bfactor:.1f} A^2")
    fit = result.guinier
    if fit is not None:
        x = fit.s2[fit.fit_shells].numpy()
        ax.plot(x, fit.intercept + fit.slope * x, "k--", lw=1.5,
                label=f"fit {fit.low_a:.1f}-{fit.high_a:.1f} A: B = {fit.bfactor:.1f} A^2")
    ax.axvline(1.0 / result.resolution_a**2, color="grey", lw=0.8, ls=":",
               label=f"resolution {result.resolution_a:.2f} A")
    ax.set_xlabel("s^2 = 1/d^2 (1/A^2)")
    ax.set_ylabel("ln mean |F| per shell")
    ax.set_title("Guinier plot")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _curve_options(result: PostprocessResult) -> dict:
    """The four FSC curves with their labels, as fsc.png draws them."""
    used = result.final_curve_name
    labels = ["unmasked", "masked", "phase-randomised (masked)", "corrected"]
    labels[CURVES.index(used)] += (f" (used: {result.curve(used).describe_resolution(0.143)}"
                                   + (", mask skipped)" if result.mask_skipped else ")"))
    return {"results": [result.curve(name) for name in CURVES], "labels": labels,
            "annotate": [name == used for name in CURVES], "resolution_ticks": True,
            "title": "Gold-standard FSC (Chen et al. 2013 correction)"}


def postprocess_fsc_figure(result: PostprocessResult) -> Figure:
    """The figure of fsc.png: unmasked, masked, phase-randomised and corrected FSC with the
    0.5 and 0.143 lines."""
    return fsc_figure(**_curve_options(result))


def _plot_curves(result: PostprocessResult, path: Path) -> None:
    options = _curve_options(result)
    plot_fsc(options.pop("results"), path, **options)


def write_postprocess(result: PostprocessResult, out_dir: str | Path,
                      pixel_size_a: float | None = None, *, overwrite: bool = False,
                      metadata: dict | None = None) -> list[Path]:
    """Write the files of `OUTPUT_NAMES` into `out_dir` (created if missing); return them.

    `pixel_size_a` defaults to the result's. `metadata` is merged into `postprocess.json`.
    FileExistsError if `out_dir` already holds `map.mrc` and not `overwrite`.
    """
    out = Path(out_dir)
    pixel = result.pixel_size_a if pixel_size_a is None else float(pixel_size_a)
    if (out / "map.mrc").exists() and not overwrite:
        raise FileExistsError(f"{out / 'map.mrc'} exists")
    out.mkdir(parents=True, exist_ok=True)
    staged = {name: out / f".{name}.{os.getpid()}.partial" for name in OUTPUT_NAMES}
    summary = postprocess_summary(result, metadata) | {"pixel_size_a": pixel}
    writers = {
        "fsc.csv": lambda p: _write_csv(result, p),
        "fsc.png": lambda p: _plot_curves(result, p),
        "guinier.png": lambda p: plot_guinier(result, p),
        "postprocess.json": lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"),
        "mask.mrc": lambda p: write_map(p, result.mask, pixel),
        "map_unsharpened.mrc": lambda p: write_map(p, result.map_unsharpened, pixel),
        "map.mrc": lambda p: write_map(p, result.map_sharpened, pixel),
    }
    try:
        for name in OUTPUT_NAMES:
            writers[name](staged[name])
        with contextlib.suppress(FileNotFoundError):  # an old map.mrc must not outlive a
            (out / "map.mrc").unlink()  # failure among the renames below
        for name in OUTPUT_NAMES:
            os.replace(staged[name], out / name)
    finally:
        for path in staged.values():
            with contextlib.suppress(OSError):
                path.unlink()
    return [out / name for name in OUTPUT_NAMES]
