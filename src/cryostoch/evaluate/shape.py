"""Shape checks of a map: the threshold that encloses a molecular volume, its extents, and its
spherical average (the featureless control a map must beat).

A protein's volume follows from its mass (about 1.21 A^3 per Dalton, Harpaz et al. 1994), so a
map of a known molecule can be thresholded to enclose that volume and measured along its
principal axes: beta-galactosidase (465 kDa) should be about 180 x 130 x 90 A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import fft3_grid

A3_PER_DALTON = 1.21


def enclosing_threshold(volume: Tensor, volume_a3: float, pixel_size_a: float) -> float:
    """The density level above which the map (N, N, N) occupies `volume_a3` cubic Angstrom."""
    voxels = int(round(volume_a3 / pixel_size_a**3))
    values = volume.flatten().double()
    voxels = min(max(voxels, 1), values.numel())
    return float(torch.topk(values, voxels).values[-1])


@dataclass(frozen=True)
class Extents:
    lengths_a: tuple[float, float, float]  # along the principal axes, largest first
    axes: Tensor  # (3, 3) rows: the principal axes (x, y, z components)
    centre_px: Tensor  # (3,) centre of mass (x, y, z) relative to the box centre N//2


def principal_extents(volume: Tensor, threshold: float, pixel_size_a: float) -> Extents:
    """Extents of the voxels of `volume` (N, N, N) above `threshold` along their principal axes
    (the full length between the outermost voxels, plus one voxel)."""
    n = volume.shape[-1]
    z, y, x = fft3_grid(n)
    inside = volume.double() >= threshold
    points = torch.stack([x[inside], y[inside], z[inside]], dim=1)  # (P, 3) in voxels
    centre = points.mean(0)
    centred = points - centre
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh.T  # (P, 3) along the axes, largest variance first
    lengths = (projected.max(0).values - projected.min(0).values + 1) * pixel_size_a
    order = torch.argsort(lengths, descending=True)
    return Extents(tuple(float(v) for v in lengths[order]), vh[order], centre)


def spherical_average(volume: Tensor) -> Tensor:
    """(N, N, N) float64: the map (N, N, N) averaged over directions about the box centre N//2,
    in one-voxel shells: the same radial profile with no features."""
    n = volume.shape[-1]
    z, y, x = fft3_grid(n)
    shells = torch.sqrt(x * x + y * y + z * z).round().long().to(volume.device)
    flat = shells.flatten()
    sums = torch.zeros(int(flat.max()) + 1, dtype=torch.float64, device=volume.device)
    sums.index_add_(0, flat, volume.flatten().double())
    counts = torch.bincount(flat).double()
    return (sums / counts)[shells]
