"""Oversampled low-frequency spectra: exact DTFT values on a fine grid near the origin.

The likelihood only needs Fourier values inside a small cutoff, but interpolating them
accurately needs a grid finer than the DFT's (RELION pads maps twice for this reason). For a
real array X on an N-point box with origin at N//2, define for any frequency k (cycles/box)

    X_hat(k) = N^(-d/2) * sum_x X(x) exp(-2 pi i k . (x - N//2) / N),

which equals `fft2c` / `fft3c` at integer k. `SpectrumLayout` describes a block of X_hat on the
grid k = j / oversampling with |k_axis| <= k_max: centred axes of length 2h+1 (zero at index h)
and a half axis kx = 0 .. h (zero at index 0), h = ceil(k_max * oversampling). The block is
computed with one small matrix product per axis (a pruned DFT): far cheaper than padding and
transforming the whole box when k_max << N/2, and exactly differentiable by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpectrumLayout:
    box_size: int
    k_max: float
    oversampling: int

    def __post_init__(self) -> None:
        if self.box_size < 2 or self.oversampling < 1 or self.k_max <= 0:
            raise ValueError(f"invalid spectrum layout {self}")

    @property
    def half_width(self) -> int:
        return int(math.ceil(self.k_max * self.oversampling - 1e-9))

    @property
    def centred_length(self) -> int:
        return 2 * self.half_width + 1

    @property
    def half_length(self) -> int:
        return self.half_width + 1

    def centred_frequencies(self, *, dtype=torch.float64, device=None) -> Tensor:
        h = self.half_width
        return torch.arange(-h, h + 1, dtype=dtype, device=device) / self.oversampling

    def half_frequencies(self, *, dtype=torch.float64, device=None) -> Tensor:
        return torch.arange(0, self.half_width + 1, dtype=dtype, device=device) / self.oversampling


def dft_matrix(frequencies: Tensor, box_size: int) -> Tensor:
    """(K, N) complex matrix F[k, x] = N^-1/2 exp(-2 pi i k (x - N//2) / N)."""
    x = torch.arange(box_size, dtype=torch.float64, device=frequencies.device) - box_size // 2
    phase = -2 * math.pi * torch.outer(frequencies.to(torch.float64), x) / box_size
    return torch.polar(torch.full_like(phase, box_size**-0.5), phase)


def _complex_dtype(real_dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


@dataclass(frozen=True)
class PrunedDft:
    """Precomputed per-axis DFT matrices for a layout, on one device and dtype."""

    layout: SpectrumLayout
    centred: Tensor  # (2h+1, N) complex
    half_real: Tensor  # (h+1, N) real part of the kx matrix
    half_imag: Tensor  # (h+1, N) imaginary part
    half_interleaved: Tensor  # (2(h+1), N): rows re0, im0, re1, im1, ... (one real GEMM)

    @staticmethod
    def create(layout: SpectrumLayout, *, dtype=torch.float32, device=None) -> PrunedDft:
        centred = dft_matrix(layout.centred_frequencies(device=device), layout.box_size)
        half = dft_matrix(layout.half_frequencies(device=device), layout.box_size)
        interleaved = torch.view_as_real(half).permute(0, 2, 1).reshape(-1, layout.box_size)
        return PrunedDft(
            layout,
            centred.to(_complex_dtype(dtype)),
            half.real.to(dtype).contiguous(),
            half.imag.to(dtype).contiguous(),
            interleaved.to(dtype).contiguous(),
        )

    def _along_x(self, x: Tensor) -> Tensor:
        # Real input: one real GEMM against interleaved (re, im) rows yields the complex
        # result's memory layout directly, cheaper than promoting x to complex.
        out = x @ self.half_interleaved.T  # (..., 2 (h+1))
        return torch.view_as_complex(out.reshape(*out.shape[:-1], -1, 2))

    def images(self, images: Tensor) -> Tensor:
        """(..., N, N) real -> (..., 2h+1, h+1) complex block [ky, kx]."""
        a = self._along_x(images)  # (..., N_y, Kx)
        return self.centred @ a  # (..., Ky, Kx)

    def volume(self, volume: Tensor) -> Tensor:
        """(N, N, N) real -> (2h+1, 2h+1, h+1) complex block [kz, ky, kx].

        Differentiable; the backward pass is the explicit adjoint (see `_PrunedVolumeDft`).
        """
        return _PrunedVolumeDft.apply(volume, self)

    def volume_forward(self, volume: Tensor) -> Tensor:
        n = self.layout.box_size
        k, kx = self.centred.shape[0], self.half_real.shape[0]
        a = self._along_x(volume.reshape(n * n, n))  # (Nz*Ny, Kx)
        # along y: bring y to the front so one GEMM covers every z
        a = a.reshape(n, n, kx).permute(1, 0, 2).reshape(n, n * kx)  # (Ny, Nz*Kx)
        b = self.centred @ a  # (Ky, Nz*Kx)
        b = b.reshape(k, n, kx).permute(1, 0, 2).reshape(n, k * kx)  # (Nz, Ky*Kx)
        return (self.centred @ b).reshape(k, k, kx)  # (Kz, Ky, Kx)

    def volume_adjoint(self, block_grad: Tensor) -> Tensor:
        """Re(F^H g): the gradient with respect to the real volume of a real loss whose
        gradient with respect to the block is `block_grad` (torch's complex convention)."""
        n = self.layout.box_size
        k, kx = self.centred.shape[0], self.half_real.shape[0]
        adj = self.centred.conj().T  # (N, K)
        a = adj @ block_grad.reshape(k, k * kx)  # (Nz, Ky*Kx)
        a = a.reshape(n, k, kx).permute(1, 0, 2).reshape(k, n * kx)  # (Ky, Nz*Kx)
        b = adj @ a  # (Ny, Nz*Kx)
        b = b.reshape(n, n, kx).permute(1, 0, 2).reshape(n * n, kx)  # (Nz*Ny, Kx)
        # Re(b conj(F_x)) = Re b . Re F + Im b . Im F: one GEMM over interleaved (re, im)
        out = torch.view_as_real(b.contiguous()).reshape(n * n, 2 * kx) @ self.half_interleaved
        return out.reshape(n, n, n)


class _PrunedVolumeDft(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: Tensor, dft: PrunedDft) -> Tensor:
        ctx.dft = dft
        return dft.volume_forward(volume)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.dft.volume_adjoint(grad), None


def oversampled_volume_spectrum(
    volume: Tensor, k_max: float, oversampling: int
) -> tuple[Tensor, SpectrumLayout]:
    """The block of `volume`'s spectrum on the oversampled grid, by zero-padded FFT.

    Used where the block is large (simulation up to Nyquist); gives the same values as
    `PrunedDft.volume` (both are the exact DTFT on the grid j / oversampling).
    """
    from cryostoch.fourier.resample import pad_real_space
    from cryostoch.fourier.transforms import rfft3c

    n = volume.shape[-1]
    layout = SpectrumLayout(n, k_max, oversampling)
    padded_size = n * oversampling
    h = layout.half_width
    if h >= padded_size // 2:
        raise ValueError("k_max exceeds the padded box")
    padded = pad_real_space(volume, padded_size, ndim=3)
    spectrum = rfft3c(padded) * oversampling**1.5  # undo the larger box's normalisation
    c = padded_size // 2
    return spectrum[c - h : c + h + 1, c - h : c + h + 1, : h + 1], layout
