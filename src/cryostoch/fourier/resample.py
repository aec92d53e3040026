"""Fourier cropping and padding: resample images or maps to another box size.

Cropping keeps the centred low-frequency block (a band-limited downsample); padding surrounds
the spectrum with zeros (a band-limited upsample). Real-space values are preserved (a constant
image stays the same constant), which with unitary transforms means scaling by (n_new/n)^(d/2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryostoch.fourier.transforms import fft2c, fft3c, ifft2c, ifft3c


def _centred_window(n_from: int, n_to: int) -> slice:
    start = n_from // 2 - n_to // 2
    return slice(start, start + n_to)


def resample_images(images: Tensor, new_size: int) -> Tensor:
    """(..., N, N) real -> (..., new_size, new_size) by Fourier crop (smaller) or pad (larger)."""
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError("images must be square")
    if new_size == n:
        return images.clone()
    spectrum = fft2c(images)
    if new_size < n:
        w = _centred_window(n, new_size)
        out = spectrum[..., w, w]
    else:
        out = spectrum.new_zeros(*spectrum.shape[:-2], new_size, new_size)
        w = _centred_window(new_size, n)
        out[..., w, w] = spectrum
    return ifft2c(out).real * (new_size / n)


def resample_volume(volume: Tensor, new_size: int) -> Tensor:
    """(N, N, N) real -> (new_size,)*3 by Fourier crop (smaller) or pad (larger)."""
    n = volume.shape[-1]
    if tuple(volume.shape[-3:]) != (n, n, n):
        raise ValueError("volume must be cubic")
    if new_size == n:
        return volume.clone()
    spectrum = fft3c(volume)
    if new_size < n:
        w = _centred_window(n, new_size)
        out = spectrum[..., w, w, w]
    else:
        out = spectrum.new_zeros(*spectrum.shape[:-3], new_size, new_size, new_size)
        w = _centred_window(new_size, n)
        out[..., w, w, w] = spectrum
    return ifft3c(out).real * (new_size / n) ** 1.5


def pad_real_space(x: Tensor, new_size: int, ndim: int) -> Tensor:
    """Zero-pad the last `ndim` axes symmetrically about the box centre N//2."""
    n = x.shape[-1]
    if new_size < n:
        raise ValueError("new_size must be >= the current size")
    out = x.new_zeros(*x.shape[:-ndim], *([new_size] * ndim))
    w = _centred_window(new_size, n)
    index = (Ellipsis,) + (w,) * ndim
    out[index] = x
    return out


def low_pass(x: Tensor, radius: float, ndim: int) -> Tensor:
    """Hard low-pass of real images (ndim=2) or volumes (ndim=3) at |k| <= radius cycles/box."""
    from cryostoch.fourier.grids import fft2_grid, fft3_grid

    n = x.shape[-1]
    if ndim == 2:
        ky, kx = fft2_grid(n, device=x.device)
        mask = kx * kx + ky * ky <= radius * radius
        return ifft2c(fft2c(x) * mask).real
    kz, ky, kx = fft3_grid(n, device=x.device)
    mask = kx * kx + ky * ky + kz * kz <= radius * radius
    return ifft3c(fft3c(x) * mask).real


def soft_low_pass(x: Tensor, radius: float, width: float, ndim: int) -> Tensor:
    """Low-pass with a raised-cosine edge from `radius` to `radius + width` (cycles per box)."""
    from cryostoch.fourier.grids import fft2_grid, fft3_grid

    n = x.shape[-1]
    grid = fft2_grid(n, device=x.device) if ndim == 2 else fft3_grid(n, device=x.device)
    k = torch.sqrt(sum(g * g for g in grid))
    t = ((k - radius) / max(width, 1e-9)).clamp(0, 1)
    weights = (0.5 * (1 + torch.cos(torch.pi * t))).to(x.dtype)
    forward, inverse = (fft2c, ifft2c) if ndim == 2 else (fft3c, ifft3c)
    return inverse(forward(x) * weights).real
