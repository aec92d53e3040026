"""The simulation's montage.png: particles beside their noise-free images and projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryostoch.io._common import atomic_path
from cryostoch.simulate.particles import ParticleParameters, ProjectionModel


def write_montage(path: Path, particles: np.ndarray, clean: np.ndarray,
                  projections: np.ndarray, title: str,
                  labels: list[str] | None = None) -> None:
    """A figure: one column per particle; rows = projection, noise-free image, particle.
    `labels` (one per column, optional) go into the column titles."""
    from cryostoch.evaluate.plots import _pyplot

    plt = _pyplot()
    k = particles.shape[0]
    rows = (("projection", projections), ("noise-free (CTF)", clean), ("particle", particles))
    fig, axes = plt.subplots(3, k, figsize=(1.9 * k, 6.2), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            a = axes[r][c]
            a.imshow(images[c], cmap="gray", origin="lower")
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(f"#{c + 1}" + (f" {labels[c]}" if labels else ""), fontsize=9)
            if c == 0:
                a.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def montage_figure(path: Path, model: ProjectionModel, first: ParticleParameters,
                   montage: dict[str, list[np.ndarray]], title: str,
                   labels: list[str] | None = None) -> None:
    """Particles beside their noise-free images and their CTF-free projections of the
    molecule (junk: the noise-free row shows what was simulated; `labels` say which)."""
    with torch.no_grad():
        projections = model.images(first.rotations, None, first.shifts_px)
    write_montage(path, np.concatenate(montage["particles"]), np.concatenate(montage["clean"]),
                  projections.float().cpu().numpy(), title, labels)


__all__ = ["montage_figure", "write_montage"]
