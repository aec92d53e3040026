"""Shape checks of a map: the threshold that encloses a molecular volume, its extents, and its
spherical average (the featureless control a map must beat).

A protein's volume follows from its mass (about 1.21 A^3 per Dalton, Harpaz et al. 1994), so a
map of a known molecule can be thresholded to enclose that volume and measured along its
principal axes: beta-galactosidase (465 kDa) should be about 180 x 130 x 90 A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import fft3_grid

A3_PER_DALTON = 1.21
# Without a mass: the share of the particle-diameter sphere a molecule fills. Measured on the
# beta-galactosidase maps (465 kDa; default diameter 181 A, 80% of the 226 A box): its volume
# is 0.18 of that sphere, and the level enclosing 0.2 of it encloses 1.1x the molecular volume
# in each of five runs checked (C1, D2, three classes, two lengths), where mean + 3 sd of the
# map enclosed 0.74-0.78x (and depends on how much of the box is solvent).
SPHERE_FRACTION = 0.2


def enclosing_threshold(volume: Tensor, volume_a3: float, pixel_size_a: float) -> float:
    """The density level above which the map (N, N, N) occupies `volume_a3` cubic Angstrom."""
    voxels = int(round(volume_a3 / pixel_size_a**3))
    values = volume.flatten().double()
    voxels = min(max(voxels, 1), values.numel())
    return float(torch.topk(values, voxels).values[-1])


def surface_level(volume: Tensor, pixel_size_a: float, *, particle_diameter_a: float,
                  mass_kda: float | None = None) -> tuple[float, str]:
    """A surface threshold for viewing a map (N, N, N), and how it was chosen: the level that
    encloses the volume of `mass_kda` of protein (A3_PER_DALTON) when the mass is known,
    otherwise the level that encloses SPHERE_FRACTION of a sphere of `particle_diameter_a`."""
    if mass_kda is not None:
        enclosed = mass_kda * 1000.0 * A3_PER_DALTON
        rule = f"encloses the volume of {mass_kda:g} kDa of protein ({enclosed:.3g} A^3)"
    else:
        enclosed = SPHERE_FRACTION * math.pi / 6.0 * particle_diameter_a**3
        rule = (f"encloses {SPHERE_FRACTION:g} of the volume of a sphere of the particle "
                f"diameter {particle_diameter_a:.4g} A ({enclosed:.3g} A^3; no mass given)")
    return enclosing_threshold(volume, enclosed, pixel_size_a), rule


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
