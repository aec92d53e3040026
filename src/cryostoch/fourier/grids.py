"""Frequency grids, masks and the half-plane coefficient set used by the likelihood."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def centred_frequencies(n: int, *, dtype=torch.float64, device=None) -> Tensor:
    """Frequencies in cycles per box of a centred axis: -n//2 .. (n-1)//2."""
    return torch.arange(n, dtype=dtype, device=device) - n // 2


def rfft2_grid(n: int, *, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """(ky, kx), each (n, n//2+1), in cycles per box, for the `rfft2c` layout."""
    ky = centred_frequencies(n, dtype=dtype, device=device)
    kx = torch.arange(n // 2 + 1, dtype=dtype, device=device)
    return torch.meshgrid(ky, kx, indexing="ij")


def fft2_grid(n: int, *, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """(ky, kx), each (n, n), in cycles per box, for the `fft2c` layout."""
    k = centred_frequencies(n, dtype=dtype, device=device)
    return torch.meshgrid(k, k, indexing="ij")


def rfft3_grid(n: int, *, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(kz, ky, kx), each (n, n, n//2+1), in cycles per box, for the `rfft3c` layout."""
    k = centred_frequencies(n, dtype=dtype, device=device)
    kx = torch.arange(n // 2 + 1, dtype=dtype, device=device)
    return torch.meshgrid(k, k, kx, indexing="ij")


def fft3_grid(n: int, *, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor, Tensor]:
    k = centred_frequencies(n, dtype=dtype, device=device)
    return torch.meshgrid(k, k, k, indexing="ij")


def radial_index(n: int, *, half: bool, ndim: int, device=None) -> Tensor:
    """Integer radius (rounded |k|) of every coefficient, for shell statistics such as FSC."""
    if ndim == 2:
        grid = rfft2_grid(n, device=device) if half else fft2_grid(n, device=device)
    elif ndim == 3:
        grid = rfft3_grid(n, device=device) if half else fft3_grid(n, device=device)
    else:
        raise ValueError("ndim must be 2 or 3")
    return torch.sqrt(sum(g * g for g in grid)).round().long()


def disc_mask(n: int, radius: float, *, half: bool = True, device=None) -> Tensor:
    """Boolean mask of 2-D coefficients with |k| <= radius (cycles per box)."""
    ky, kx = rfft2_grid(n, device=device) if half else fft2_grid(n, device=device)
    return kx * kx + ky * ky <= radius * radius


def ball_mask(n: int, radius: float, *, half: bool = True, device=None) -> Tensor:
    """Boolean mask of 3-D coefficients with |k| <= radius (cycles per box)."""
    kz, ky, kx = rfft3_grid(n, device=device) if half else fft3_grid(n, device=device)
    return kx * kx + ky * ky + kz * kz <= radius * radius


def real_space_disc(n: int, radius_px: float, *, device=None) -> Tensor:
    """Boolean (n, n) mask of pixels within `radius_px` of the box centre."""
    y, x = fft2_grid(n, device=device)  # the same centred integer coordinates in real space
    return x * x + y * y <= radius_px * radius_px


def real_space_ball(n: int, radius_px: float, *, device=None) -> Tensor:
    z, y, x = fft3_grid(n, device=device)
    return x * x + y * y + z * z <= radius_px * radius_px


@dataclass(frozen=True)
class HalfPlaneCoefficients:
    """The 2-D frequencies inside a cutoff disc, one of each conjugate pair.

    A point (kx, ky) is kept when kx > 0, or kx == 0 and ky >= 0. `weights` is 2 for points whose
    conjugate twin is left out and 1 for k = 0, so that for a real image
    `sum(weights * |F(k)|^2)` over these points equals the sum over the full disc, i.e. the
    real-space squared norm of the band-limited image (Parseval).
    """

    kx: Tensor  # (M,) cycles per box
    ky: Tensor  # (M,)
    weights: Tensor  # (M,)
    radius: float
    box_size: int

    @property
    def n_points(self) -> int:
        return int(self.kx.shape[0])

    @property
    def degrees_of_freedom(self) -> int:
        """Real degrees of freedom of a real image band-limited to the disc."""
        return int(self.weights.sum().round().item())

    def rfft_indices(self) -> tuple[Tensor, Tensor]:
        """(row, column) indices of these points in an `rfft2c` array of the box size."""
        return (self.ky + self.box_size // 2).long(), self.kx.long()

    def to(self, device=None, dtype=None) -> HalfPlaneCoefficients:
        return HalfPlaneCoefficients(
            self.kx.to(device=device, dtype=dtype),
            self.ky.to(device=device, dtype=dtype),
            self.weights.to(device=device, dtype=dtype),
            self.radius,
            self.box_size,
        )


def half_plane_coefficients(
    box_size: int, radius: float, *, dtype=torch.float64, device=None
) -> HalfPlaneCoefficients:
    """The half-plane coefficient set inside |k| <= radius (cycles per box), radius < N/2."""
    if not 0 < radius < box_size / 2:
        raise ValueError(f"cutoff radius {radius} must be in (0, box/2 = {box_size / 2})")
    r = int(radius)
    ky, kx = torch.meshgrid(
        torch.arange(-r, r + 1, dtype=dtype, device=device),
        torch.arange(0, r + 1, dtype=dtype, device=device),
        indexing="ij",
    )
    inside = (kx * kx + ky * ky <= radius * radius) & ((kx > 0) | (ky >= 0))
    kx, ky = kx[inside], ky[inside]
    weights = torch.where((kx == 0) & (ky == 0), 1.0, 2.0).to(dtype)
    return HalfPlaneCoefficients(kx, ky, weights, float(radius), int(box_size))
