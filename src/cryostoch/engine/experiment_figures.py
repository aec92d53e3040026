"""The paper study's map comparisons: Fig. 4 and 6 (each map as three projections aligned
onto the truth) and the table's FSC columns against the truth."""

from __future__ import annotations

from pathlib import Path

import torch

from cryostoch.engine.experiment_runs import BASELINES, MethodRun
from cryostoch.evaluate.align import align_maps, apply_alignment
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.evaluate.plots import projection_gallery_figure
from cryostoch.io.mrc import read_map

# the table's column of the one-epoch map's FSC 0.5 over the cutoff resolution
ONE_EPOCH_KEY = "one_epoch_fsc_0.5_over_cutoff"


def save_figure(fig, path: Path) -> None:
    """Write a figure (pyplot's or a plain Agg one) and release it."""
    from cryostoch.evaluate.plots import _pyplot

    fig.savefig(path, dpi=90)
    _pyplot().close(fig)  # a no-op for a figure outside pyplot


def _snapshot(run: MethodRun, count: int) -> torch.Tensor | None:
    path = run.out_dir / "snapshots" / f"map_{count:09d}.mrc"
    if path.exists():
        return read_map(path)[0]
    return None


def map_figures(out: Path, runs: list[MethodRun], truth: torch.Tensor | None, pixel: float,
                snapshot_counts: tuple[int, ...], n_train: int,
                baseline_iterations: int) -> dict[str, torch.Tensor]:
    """Fig. 4 (every stochastic run's snapshots and final map) and Fig. 6 (the baselines
    against one epoch of SGD), each map as three projections aligned onto the truth (on real
    data, onto SGD's final map), the reference in the first row. Returns the aligned final
    maps by method."""
    by_name = {r.name: r for r in runs}
    sgd = by_name.get("sgd", by_name["cryostoch"])
    reference = truth if truth is not None else sgd.volume
    reference_label = "truth" if truth is not None else f"reference: {sgd.name}"
    # One alignment per run (its final map onto the reference), reused for its snapshots.
    alignments = {r.name: align_maps(reference, r.volume, pixel_size_a=pixel) for r in runs}

    def aligned(run: MethodRun, volume: torch.Tensor | None, oversampling: int | None = None
                ) -> torch.Tensor | None:
        return None if volume is None else apply_alignment(volume, alignments[run.name],
                                                           oversampling=oversampling)

    final = {r.name: aligned(r, r.volume) for r in runs}  # finely resampled: the FSC uses them
    stochastic = [r for r in runs if r.name not in BASELINES]
    # snapshots only drawn: plain trilinear resampling (8x cheaper at box 128, looks the same)
    rows = [[aligned(r, _snapshot(r, c), 1) for c in snapshot_counts] + [final[r.name]]
            for r in stochastic]
    save_figure(projection_gallery_figure(
        rows, [r.name for r in stochastic], [f"{c} grads" for c in snapshot_counts] + ["end"],
        reference=reference, reference_label=reference_label), out / "fig4_maps.png")
    fig6 = [[final[m]] for m in BASELINES] + [[aligned(sgd, _snapshot(sgd, n_train), 1)]]
    save_figure(projection_gallery_figure(
        fig6, [f"projmatch, {baseline_iterations} it.", f"EM, {baseline_iterations} it.",
               f"{sgd.name}, 1 epoch"], ["aligned map"], reference=reference,
        reference_label=reference_label), out / "fig6_baselines.png")
    return final


def fsc_columns(run: MethodRun, aligned_final: torch.Tensor, truth: torch.Tensor,
                pixel: float, cutoff_a: float, n_train: int) -> dict:
    """The final map's FSC 0.5 against the truth (A, and over the cutoff) and, for the
    stochastic runs, that of the one-epoch snapshot aligned on its own (the paper's "a
    reasonable structure within one epoch"; it may sit elsewhere than the final map)."""
    resolution_a = compute_fsc(truth, aligned_final, pixel_size_a=pixel).resolution_at(0.5)
    columns = {"fsc_0.5_a": round(resolution_a, 1),
               "fsc_0.5_over_cutoff": round(round(resolution_a, 1) / cutoff_a, 2)}
    epoch = None if run.name in BASELINES else _snapshot(run, n_train)
    if epoch is not None:
        moved = apply_alignment(epoch, align_maps(truth, epoch, pixel_size_a=pixel))
        columns[ONE_EPOCH_KEY] = round(
            compute_fsc(truth, moved, pixel_size_a=pixel).resolution_at(0.5) / cutoff_a, 2)
    return columns

