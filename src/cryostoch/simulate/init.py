"""The paper's random initial density (Fig. 5): a sum of random spheres."""

from __future__ import annotations

import torch
from torch import Tensor

from cryostoch.fourier.grids import fft3_grid


def random_spheres_volume(
    box_size: int,
    particle_radius_px: float,
    generator: torch.Generator,
    *,
    n_spheres: int = 30,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A (box, box, box) density made of `n_spheres` soft-edged spheres of random radius
    (5-25% of the particle radius) and random positive density, centred uniformly inside the
    particle radius. Deterministic given the generator's seed; the mean density is 1 inside
    the occupied voxels (scale it to the data afterwards)."""
    if box_size < 8:
        raise ValueError(f"box_size must be >= 8, got {box_size}")
    if not 0 < particle_radius_px <= box_size / 2:
        raise ValueError(f"particle radius must be in (0, box/2], got {particle_radius_px}")
    if n_spheres < 1:
        raise ValueError("n_spheres must be >= 1")
    g = generator
    z, y, x = fft3_grid(box_size, dtype=torch.float64)
    volume = torch.zeros(box_size, box_size, box_size, dtype=torch.float64)
    for _ in range(n_spheres):
        radius = particle_radius_px * (0.05 + 0.20 * torch.rand(1, generator=g).item())
        # uniform inside the ball of radius (particle radius - sphere radius)
        direction = torch.randn(3, generator=g, dtype=torch.float64)
        direction /= direction.norm()
        distance = (particle_radius_px - radius) * torch.rand(1, generator=g).item() ** (1 / 3)
        cx, cy, cz = (direction * distance).tolist()
        density = 0.5 + torch.rand(1, generator=g).item()
        r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        # a one-voxel soft edge avoids ringing in Fourier space
        volume += density * torch.clamp(radius + 0.5 - r, 0.0, 1.0)
    occupied = volume > 0
    if occupied.any():
        volume /= volume[occupied].mean()
    return volume.to(device=device, dtype=dtype)
