"""A built-in hand-crafted density, in the spirit of the paper's synthetic molecule (Fig. 2).

The phantom is defined in Angstrom, relative to the box centre (pixel `N // 2` on each axis,
coordinates ordered x, y, z), so it looks the same at any box and pixel size that hold it. It
is an elongated, mostly cylindrical molecule about 195 A long and about 70 A wide, built as a
sum of smooth primitives, each a solid of uniform density whose surface is blurred by a
Gaussian of width `edge = max(3 A, pixel size)` (density
`amplitude * erfc((d - radius) / (sqrt(2) edge)) / 2` at distance `d` from the solid's core),
so it is band-limited enough to be sampled without visible aliasing:

- body: a capsule (cylinder with hemispherical caps) of radius 20 A along z, core z = -68 .. 56,
  density 0.8;
- collar: a flattened ellipsoid centred at (8, 0, -34) A with semi-axes 34 x 22 x 12 A
  (x, y, z): it makes the cross-section non-circular;
- head: an ellipsoid at (14, -6, 76) A with semi-axes 24 x 17 x 24 A, off the axis;
- foot: an ellipsoid at (-8, 14, -80) A with semi-axes 16 x 24 x 14 A, off the axis the other
  way;
- three bumps (spheres of radius 13 A) centred 24 A from the axis at azimuths 0, 110 and 230
  degrees and heights -55, -5 and +35 A: a right-handed helical staircase, which fixes the
  hand;
- a bent arm (two capsules of radius 9 A): out from the body along +y at z = 15 A to
  (0, 44, 22) A, then bent up and sideways to (-14, 50, 52) A.

Densities add where primitives overlap (1.0-1.3 for the features, peak about 2.5). The solids
span x = -28 .. 41 A, y = -31 .. 58 A (the arm), z = -93 .. 99 A and lie within 102 A of the
box centre; `phantom_radius_a` (that plus two edge widths) is what must fit in the box's
inscribed sphere.

No rotation maps the phantom onto itself or onto its mirror image: its orientation is
identifiable from projections and its hand is defined (tests check its correlation with its
mirror images and with its rotations by 180 degrees about the long axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import fft3_grid

EDGE_A = 3.0  # smallest Gaussian edge width, Angstrom


@dataclass(frozen=True)
class Capsule:
    """Points within `radius_a` of the segment from `start_a` to `end_a` (x, y, z in A)."""

    start_a: tuple[float, float, float]
    end_a: tuple[float, float, float]
    radius_a: float
    amplitude: float = 1.0

    def excess(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Signed distance (A) from the surface: negative inside."""
        ax, ay, az = self.start_a
        dx, dy, dz = (e - s for e, s in zip(self.end_a, self.start_a, strict=True))
        length2 = dx * dx + dy * dy + dz * dz
        px, py, pz = x - ax, y - ay, z - az
        if length2 > 0:
            t = ((px * dx + py * dy + pz * dz) / length2).clamp(0.0, 1.0)
            px, py, pz = px - t * dx, py - t * dy, pz - t * dz
        return torch.sqrt(px * px + py * py + pz * pz) - self.radius_a

    def bounding_radius_a(self) -> float:
        """Largest distance (A) of the solid from the origin."""
        return max(math.dist(self.start_a, (0, 0, 0)), math.dist(self.end_a, (0, 0, 0))) + (
            self.radius_a
        )


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid with centre `centre_a` and semi-axes `semi_axes_a` (A)."""

    centre_a: tuple[float, float, float]
    semi_axes_a: tuple[float, float, float]
    amplitude: float = 1.0

    def excess(self, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        """Approximate signed distance (A) from the surface: the scaled radius minus one, times
        the geometric mean of the semi-axes (exact for a sphere)."""
        (cx, cy, cz), (sx, sy, sz) = self.centre_a, self.semi_axes_a
        rho = torch.sqrt(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2)
        return (rho - 1.0) * (sx * sy * sz) ** (1 / 3)

    def bounding_radius_a(self) -> float:
        """Largest distance (A) of the solid from the origin (to 0.1 A: the surface sampled at
        a Fibonacci set of 4,000 directions, plus a margin)."""
        k = torch.arange(4000, dtype=torch.float64) + 0.5
        cos_polar = 1 - 2 * k / 4000
        sin_polar = torch.sqrt(1 - cos_polar**2)
        azimuth = math.pi * (3 - math.sqrt(5)) * k
        unit = torch.stack(
            [sin_polar * torch.cos(azimuth), sin_polar * torch.sin(azimuth), cos_polar], 1
        )
        points = torch.tensor(self.centre_a) + unit * torch.tensor(self.semi_axes_a)
        return float(points.norm(dim=1).max()) + 0.1


def _on_body(radius_a: float, azimuth_deg: float, height_a: float) -> tuple[float, float, float]:
    a = math.radians(azimuth_deg)
    return (radius_a * math.cos(a), radius_a * math.sin(a), height_a)


PHANTOM_PRIMITIVES: tuple[Capsule | Ellipsoid, ...] = (
    Capsule((0.0, 0.0, -68.0), (0.0, 0.0, 56.0), 20.0, 0.8),  # body
    Ellipsoid((8.0, 0.0, -34.0), (34.0, 22.0, 12.0), 1.0),  # collar
    Ellipsoid((14.0, -6.0, 76.0), (24.0, 17.0, 24.0), 1.2),  # head
    Ellipsoid((-8.0, 14.0, -80.0), (16.0, 24.0, 14.0), 1.0),  # foot
    # bumps: a right-handed helical staircase on the body's surface
    Capsule(_on_body(24.0, 0.0, -55.0), _on_body(24.0, 0.0, -55.0), 13.0, 1.3),
    Capsule(_on_body(24.0, 110.0, -5.0), _on_body(24.0, 110.0, -5.0), 13.0, 1.3),
    Capsule(_on_body(24.0, 230.0, 35.0), _on_body(24.0, 230.0, 35.0), 13.0, 1.3),
    # bent arm
    Capsule((0.0, 18.0, 15.0), (0.0, 44.0, 22.0), 9.0, 1.3),
    Capsule((0.0, 44.0, 22.0), (-14.0, 50.0, 52.0), 9.0, 1.3),
)


def phantom_edge_a(pixel_size_a: float) -> float:
    """Gaussian edge width (A) of the primitives at this pixel size."""
    return max(EDGE_A, float(pixel_size_a))


def phantom_radius_a(pixel_size_a: float = 0.0) -> float:
    """Radius (A) of the sphere about the box centre that holds the phantom, soft edges
    included (two edge widths beyond the solids' surfaces)."""
    solid = max(p.bounding_radius_a() for p in PHANTOM_PRIMITIVES)
    return solid + 2 * phantom_edge_a(pixel_size_a)


def phantom_length_a() -> float:
    """Extent (A) of the solids along the long axis z."""
    top = max(
        p.centre_a[2] + p.semi_axes_a[2] if isinstance(p, Ellipsoid)
        else max(p.start_a[2], p.end_a[2]) + p.radius_a
        for p in PHANTOM_PRIMITIVES
    )
    bottom = min(
        p.centre_a[2] - p.semi_axes_a[2] if isinstance(p, Ellipsoid)
        else min(p.start_a[2], p.end_a[2]) - p.radius_a
        for p in PHANTOM_PRIMITIVES
    )
    return top - bottom


def phantom_volume(
    box_size: int,
    pixel_size_a: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The phantom sampled on a (box, box, box) grid `[z, y, x]` of spacing `pixel_size_a`.

    Densities add where primitives overlap (peak about 1-2). Raises ValueError for a box or
    pixel size that cannot hold it (see `phantom_radius_a`).
    """
    if box_size < 2:
        raise ValueError(f"box_size must be >= 2, got {box_size}")
    if not pixel_size_a > 0:
        raise ValueError(f"pixel_size_a must be positive, got {pixel_size_a}")
    z, y, x = (g * pixel_size_a for g in fft3_grid(box_size, dtype=torch.float64, device=device))
    edge = phantom_edge_a(pixel_size_a) * math.sqrt(2.0)
    volume = torch.zeros_like(x)
    for primitive in PHANTOM_PRIMITIVES:
        volume += primitive.amplitude * 0.5 * torch.special.erfc(primitive.excess(x, y, z) / edge)
    return volume.to(dtype)


__all__ = [
    "EDGE_A",
    "PHANTOM_PRIMITIVES",
    "Capsule",
    "Ellipsoid",
    "phantom_edge_a",
    "phantom_length_a",
    "phantom_radius_a",
    "phantom_volume",
]
