"""Superimpose a map on a reference as `cryostoch align` does, on top of `align_maps`:
`align_onto` resamples the moving map onto the reference's grid first (another box or pixel
size) and reports the FSC; `symmetry_equivalent` picks, for a symmetric reference, the
equivalent alignment with the smallest rotation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.evaluate.align import Alignment, align_maps
from cryostoch.evaluate.fsc import FscResult, compute_fsc
from cryostoch.evaluate.transform import resample_onto_grid


def symmetry_equivalent(alignment: Alignment, group_matrices: Tensor) -> Alignment:
    """For a reference with point-group symmetry `G` (`(G, 3, 3)` matrices about the box centre,
    e.g. `point_group("D2").matrices`): the alignment `(g R, g s)` with the smallest rotation
    angle. Turning the aligned map by any `g` of `G` fits a G-symmetric reference equally well
    (`aligned(g^T x) = M'((g R)^T (x - g s))`), so the search may return any of them; this picks
    one representative, the rotation nearest the identity."""
    g = group_matrices.to(dtype=torch.float64, device="cpu")
    candidates = g @ alignment.rotation
    best = int(torch.diagonal(candidates, dim1=-2, dim2=-1).sum(-1).argmax())
    return Alignment(candidates[best].clone(), g[best] @ alignment.shift_px,
                     alignment.mirrored, alignment.correlation)


@dataclass(frozen=True)
class AlignedMap:
    """What `align_onto` found: the alignment on the reference's grid, the moving map resampled
    onto that grid and aligned, and its FSC against the reference."""

    alignment: Alignment
    volume: Tensor  # (N, N, N) on the reference's grid
    fsc: FscResult
    resampled: bool  # the moving map had another box or pixel size


def align_onto(
    reference: Tensor,
    moving: Tensor,
    *,
    pixel_size_a: float,
    moving_pixel_size_a: float | None = None,
    allow_mirror: bool = True,
    group_matrices: Tensor | None = None,
    resolution_a: float | None = None,
    generator: torch.Generator | None = None,
) -> AlignedMap:
    """Superimpose `moving` on `reference` (`(N, N, N)`, `pixel_size_a`): the moving map (any
    cubic box, `moving_pixel_size_a`, default the same) is first resampled onto the reference's
    grid (`resample_onto_grid`), then aligned (`align_maps`; with `group_matrices`, the
    reference's point group, reported as its `symmetry_equivalent`) and its FSC against the
    reference computed."""
    n = reference.shape[-1]
    moving_pixel = pixel_size_a if moving_pixel_size_a is None else moving_pixel_size_a
    resampled = moving.shape[-1] != n or abs(moving_pixel / pixel_size_a - 1.0) > 1e-4
    on_grid = resample_onto_grid(moving.to(reference.device), moving_pixel, n, pixel_size_a)
    alignment = align_maps(reference, on_grid, pixel_size_a=pixel_size_a,
                           resolution_a=resolution_a, generator=generator,
                           allow_mirror=allow_mirror)
    if group_matrices is not None:
        alignment = symmetry_equivalent(alignment, group_matrices)
    aligned = alignment.apply(on_grid)
    fsc = compute_fsc(reference, aligned, pixel_size_a=pixel_size_a)
    return AlignedMap(alignment, aligned, fsc, resampled)


__all__ = ["AlignedMap", "align_onto", "symmetry_equivalent"]
