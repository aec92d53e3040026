"""In-plane shifts as Fourier phase factors (see docs/conventions.md for the sign)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shift_phases(kx: Tensor, ky: Tensor, shifts_px: Tensor, box_size: int) -> Tensor:
    """exp(-2 pi i k.t / N): multiplying a spectrum by this translates the image by +t pixels.

    kx, ky: (..., M) cycles per box; shifts_px: (T, 2) as (tx, ty). Returns (T, ..., M).
    """
    t = shifts_px.to(kx.dtype)
    shape = (t.shape[0],) + (1,) * kx.ndim
    phase = (kx * t[:, 0].reshape(shape) + ky * t[:, 1].reshape(shape)) * (-2 * math.pi / box_size)
    return torch.polar(torch.ones_like(phase), phase)


def shift_images(images: Tensor, shifts_px: Tensor) -> Tensor:
    """Translate real images (B, N, N) by per-image shifts (B, 2) pixels (periodic, exact)."""
    from cryostoch.fourier.grids import rfft2_grid
    from cryostoch.fourier.transforms import irfft2c, rfft2c

    n = images.shape[-1]
    ky, kx = rfft2_grid(n, dtype=images.dtype, device=images.device)
    t = shifts_px.to(images.dtype)
    phase = (kx * t[:, 0, None, None] + ky * t[:, 1, None, None]) * (-2 * math.pi / n)
    return irfft2c(rfft2c(images) * torch.polar(torch.ones_like(phase), phase), n)
