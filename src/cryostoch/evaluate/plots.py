"""Figures: the reconstruction report and map views (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    """PNG: held-out NLL against gradient evaluations, then central slices and projections."""
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[0, :2])
    points = [(m["gradient_evaluations"], m["test_nll"]) for m in metrics
              if m.get("test_nll") is not None]
    if points:
        x, y = zip(*points, strict=True)
        ax.plot(np.maximum(np.asarray(x, dtype=float), 1), y, marker=".", lw=1)
        ax.set_xscale("log")
    ax.set_xlabel("gradient evaluations (single images)")
    ax.set_ylabel("held-out negative log-likelihood per image")
    ax.set_title(title or "test NLL")
    ax.grid(alpha=0.3)
    objective = [(m["gradient_evaluations"], m["minibatch_objective"]) for m in metrics
                 if m.get("minibatch_objective") is not None]
    ax2 = fig.add_subplot(grid[1, :2])
    if objective:
        x, y = zip(*objective, strict=True)
        ax2.plot(np.maximum(np.asarray(x, dtype=float), 1), y, lw=0.6, color="tab:gray")
        ax2.set_xscale("log")
    stages = [(m["gradient_evaluations"], m.get("cutoff_resolution_a")) for m in metrics]
    for (_, before), (x, after) in zip(stages, stages[1:], strict=False):
        if before is not None and after is not None and before != after:
            ax2.axvline(max(x, 1), color="tab:orange", lw=0.8, ls="--")
            ax2.annotate(f"{after:.0f} A", (max(x, 1), 1), xycoords=("data", "axes fraction"),
                         fontsize=7, color="tab:orange", va="top")
    ax2.set_xlabel("gradient evaluations")
    ax2.set_ylabel("minibatch objective (at the stage's cutoff)")
    ax2.grid(alpha=0.3)
    slices, projections = map_views(volume)
    names = ["z", "y", "x"]
    small = grid[:, 2:].subgridspec(2, 3)
    for i in range(3):
        a = fig.add_subplot(small[0, i])
        a.imshow(slices[i], cmap="gray", origin="lower")
        a.set_title(f"central slice {names[i]}", fontsize=9)
        a.axis("off")
        b = fig.add_subplot(small[1, i])
        b.imshow(projections[i], cmap="gray", origin="lower")
        b.set_title(f"projection along {names[i]}", fontsize=9)
        b.axis("off")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def map_gallery(
    path: Path | str,
    volumes: Sequence[Sequence[Tensor | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    view: str = "projection",
) -> None:
    """A grid of maps (rows x columns), each shown by its projection (or slice) along z."""
    plt = _pyplot()
    rows, cols = len(volumes), len(column_labels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            a = axes[r][c]
            a.set_xticks([])
            a.set_yticks([])
            v = volumes[r][c]
            if v is not None:
                s, p = map_views(v)
                a.imshow(p[0] if view == "projection" else s[0], cmap="gray", origin="lower")
            if r == 0:
                a.set_title(column_labels[c], fontsize=9)
            if c == 0:
                a.set_ylabel(row_labels[r], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


