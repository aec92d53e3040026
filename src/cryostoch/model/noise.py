"""Coloured Gaussian noise: a radially symmetric variance sigma^2(shell) per optics group.

Real cryo-EM noise is not white (ice, detector, the motion-correction filter): on the shared
beta-galactosidase particles the background power at 226-45 A is 3-4x that at 11-8 A. The
likelihood then weights coefficient k of an image of group g by the precision
1 / sigma^2_g(|k|) (cryoSPARC's "symmetric" noise model, RELION's sigma2_noise). Variances are
in the units of the normalised images (white noise of real-space sigma 1 has sigma^2 = 1 in
every shell of the centred unitary DFT), so a white spectrum is all ones.

Two estimates: from the background (the power spectrum of the pixels outside the particle,
corrected for the area the mask keeps) at the start, and from the expected residual
|X - C S|^2 under the pose posterior during the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import HalfPlaneCoefficients, fft2_grid, radial_index
from cryostoch.fourier.transforms import rfft2c


def coefficient_shells(coefficients: HalfPlaneCoefficients) -> Tensor:
    """(M,) long: the shell round(|k|) of every coefficient inside the cutoff."""
    return torch.sqrt(coefficients.kx**2 + coefficients.ky**2).round().long()


@dataclass(frozen=True)
class NoiseSpectrum:
    """variance: (G, S) float64, sigma^2 of optics group g in shell s (Fourier pixels of the
    working box, s = round(|k|)); a shell beyond S - 1 uses the last one."""

    variance: Tensor

    def __post_init__(self) -> None:
        if self.variance.dim() != 2 or self.variance.shape[1] < 1:
            raise ValueError("variance must have shape (groups, shells)")
        if not bool(torch.isfinite(self.variance).all()) or not bool((self.variance > 0).all()):
            raise ValueError("noise variances must be finite and positive")

    @staticmethod
    def white(n_groups: int, n_shells: int) -> NoiseSpectrum:
        return NoiseSpectrum(torch.ones(n_groups, n_shells, dtype=torch.float64))

    @property
    def n_groups(self) -> int:
        return int(self.variance.shape[0])

    def precision(self, coefficients: HalfPlaneCoefficients, dtype: torch.dtype
                  ) -> Tensor:
        """(G, M) precision 1 / sigma^2 of every group at the coefficients inside a cutoff."""
        shells = coefficient_shells(coefficients).clamp(max=self.variance.shape[1] - 1)
        shells = shells.to(self.variance.device)
        return (1.0 / self.variance[:, shells]).to(device=coefficients.kx.device, dtype=dtype)


def soft_background_mask(box_size: int, radius_px: float, edge_px: float = 3.0, *,
                         device=None) -> Tensor:
    """(N, N) float64: 0 inside `radius_px`, 1 beyond `radius_px + edge_px`, a raised-cosine
    ramp between (a hard edge would ring and leak power between shells)."""
    y, x = fft2_grid(box_size, device=device)
    r = torch.sqrt(x * x + y * y)
    ramp = ((r - radius_px) / edge_px).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(torch.pi * ramp)


def background_power(images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-shell summed power of masked images and the number of coefficients per shell.

    images: (B, N, N) real, background mean removed; mask: (N, N) real.
    Returns (power (B, S), counts (S,)) over the rfft half plane with twin weights, S = N//2+1
    shells; mean power of shell s = power / counts.
    """
    n = images.shape[-1]
    spectrum = rfft2c(images * mask)
    shells = radial_index(n, half=True, ndim=2, device=images.device)
    weights = torch.full_like(shells, 2, dtype=torch.float64)
    weights[:, 0] = 1  # the kx = 0 column holds each conjugate pair once
    if n % 2 == 0:
        weights[:, -1] = 1  # so does the Nyquist column
    keep = shells <= n // 2
    power = (spectrum.real**2 + spectrum.imag**2) * weights
    out = torch.zeros(images.shape[0], n // 2 + 1, dtype=torch.float64, device=images.device)
    out.index_add_(1, shells[keep], power[:, keep].to(torch.float64))
    counts = torch.zeros(n // 2 + 1, dtype=torch.float64, device=images.device)
    counts.index_add_(0, shells[keep], weights[keep])
    return out, counts


def spectrum_from_background(power_sum: Tensor, counts: Tensor, n_images: Tensor,
                             mask: Tensor) -> Tensor:
    """sigma^2 per group and shell from summed background power.

    power_sum: (G, S) summed over each group's images; counts: (S,); n_images: (G,);
    mask: (N, N), whose mean square is the share of the noise power it keeps.
    Returns (G, S) float64, shells smoothed with their neighbours (the mask blurs the
    spectrum over about a shell anyway) and floored at 1% of the group's median. Shells 0 and
    1 take shell 2's value: subtracting each image's background mean removes the mask's own
    low-frequency component, which biases them low (on white noise by 70% and 30%).
    """
    keep_fraction = float((mask**2).mean())
    mean = power_sum / (counts.clamp(min=1) * n_images.clamp(min=1)[:, None] * keep_fraction)
    if mean.shape[1] > 2:
        mean = mean.clone()
        mean[:, :2] = mean[:, 2:3]
    padded = torch.cat([mean[:, :1], mean, mean[:, -1:]], dim=1)
    smooth = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    floor = 0.01 * smooth.median(dim=1, keepdim=True).values
    return torch.maximum(smooth, floor)


def residual_power(slices: Tensor, data_sums: Tensor, ctf2_sums: Tensor, image_power: Tensor,
                   weights: Tensor) -> Tensor:
    """sum_i E_posterior |X_i(k) - C_i(k) S(k)|^2 per coefficient k, (M,) float64.

    slices: (R, M) complex model rows (directions, or classes x directions); data_sums (R, M)
    complex and ctf2_sums (R, M) real: the posterior sums sum_ipt r w C y and sum_ip r w C^2 of
    `MarginalLikelihood.evaluate(..., statistics=True)`, which carry the weights `weights` (M,)
    (twin weights times the noise precision they were computed with); image_power: (M,)
    sum_i |X_i(k)|^2. Expands |y - C S|^2 = |y|^2 - 2 Re(conj(y) C S) + C^2 |S|^2.
    """
    s = slices.to(torch.complex128)
    cross = (s.conj() * data_sums.to(torch.complex128)).real.sum(0)
    quadratic = ((s.real**2 + s.imag**2) * ctf2_sums.double()).sum(0)
    return image_power.double() - (2 * cross - quadratic) / weights.double()


def shell_means(values: Tensor, coefficients: HalfPlaneCoefficients, n_shells: int) -> Tensor:
    """(S,) mean of per-coefficient `values` (M,) in each shell round(|k|); NaN where a shell
    has no coefficient (beyond the cutoff)."""
    shells = coefficient_shells(coefficients).cpu()
    sums = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, shells, values.double().cpu())
    counts = torch.bincount(shells, minlength=n_shells).double()
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


def updated_spectrum(spectrum: NoiseSpectrum, group: int, shell_variance: Tensor
                     ) -> NoiseSpectrum:
    """`spectrum` with group `group`'s shells replaced where `shell_variance` (S,) is finite
    (floored at 1% of the group's median, as the background estimate is)."""
    variance = spectrum.variance.clone()
    row = variance[group]
    known = torch.isfinite(shell_variance)
    floor = 0.01 * float(row.median())
    row[known] = shell_variance[known].to(row).clamp(min=floor)
    return NoiseSpectrum(variance)
