"""Centred unitary DFTs (see docs/conventions.md).

`fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`: the box centre `N // 2` is the real-space
origin and index `N // 2` of each centred Fourier axis is zero frequency. Half-space (rfft)
variants keep the last axis unshifted (kx = 0 .. N/2).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fft2c(x: Tensor) -> Tensor:
    dims = (-2, -1)
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims, norm="ortho"), dim=dims)


def ifft2c(x: Tensor) -> Tensor:
    dims = (-2, -1)
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(x, dim=dims, norm="ortho"), dim=dims)


def fft3c(x: Tensor) -> Tensor:
    dims = (-3, -2, -1)
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims, norm="ortho"), dim=dims)


def ifft3c(x: Tensor) -> Tensor:
    dims = (-3, -2, -1)
    x = torch.fft.ifftshift(x, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(x, dim=dims, norm="ortho"), dim=dims)


def rfft2c(x: Tensor) -> Tensor:
    """(..., N, N) real -> (..., N, N//2+1) complex; ky centred, kx = 0 .. N/2."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.rfftn(x, dim=(-2, -1), norm="ortho"), dim=-2)


def irfft2c(x: Tensor, n: int) -> Tensor:
    x = torch.fft.ifftshift(x, dim=-2)
    out = torch.fft.irfftn(x, s=(n, n), dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(out, dim=(-2, -1))


def rfft3c(x: Tensor) -> Tensor:
    """(..., N, N, N) real -> (..., N, N, N//2+1) complex; kz, ky centred, kx = 0 .. N/2."""
    x = torch.fft.ifftshift(x, dim=(-3, -2, -1))
    return torch.fft.fftshift(torch.fft.rfftn(x, dim=(-3, -2, -1), norm="ortho"), dim=(-3, -2))


def irfft3c(x: Tensor, n: int) -> Tensor:
    x = torch.fft.ifftshift(x, dim=(-3, -2))
    out = torch.fft.irfftn(x, s=(n, n, n), dim=(-3, -2, -1), norm="ortho")
    return torch.fft.fftshift(out, dim=(-3, -2, -1))
