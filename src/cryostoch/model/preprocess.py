"""Data preprocessing done once at load time: noise level, contrast sign, normalisation.

The paper rescales images so that the noise standard deviation is 1. We estimate the noise
from the background (pixels outside the particle radius, where there is only noise, ice and
neighbours) and take the median over images, which is robust to a few junk images. The sign
("protein white" or "black") is detected by phase-flipping each image with its CTF, low-pass
filtering, and comparing the mean inside the particle to the mean of the background: the
projected density of a protein is positive where the data are "white".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import real_space_disc, rfft2_grid
from cryostoch.fourier.transforms import irfft2c, rfft2c
from cryostoch.operators.ctf import CtfParameters, evaluate_ctf


@dataclass(frozen=True)
class NormalisationStatistics:
    noise_sigma: float  # in the data's units, before normalisation
    contrast_sign: int  # +1: protein white as given; -1: the data must be inverted
    sign_score: float  # mean inside-minus-background of phase-flipped images / noise
    n_images_used: int


def background_statistics(images: Tensor, radius_px: float) -> tuple[Tensor, Tensor]:
    """Per-image mean and standard deviation of pixels outside `radius_px` of the centre."""
    n = images.shape[-1]
    outside = ~real_space_disc(n, radius_px, device=images.device)
    if int(outside.sum()) < 16:
        raise ValueError(f"particle radius {radius_px} px leaves no background in a {n} px box")
    values = images[..., outside]
    return values.mean(-1), values.std(-1)


def phase_flipped_low_pass(
    images: Tensor, ctf: CtfParameters, pixel_size_a: float, resolution_a: float
) -> Tensor:
    """Images multiplied by sign(CTF) in Fourier space and low-passed at `resolution_a`."""
    n = images.shape[-1]
    ky, kx = rfft2_grid(n, dtype=torch.float64, device=images.device)
    scale = 1.0 / (n * pixel_size_a)
    values = evaluate_ctf(ctf, (kx * scale).unsqueeze(0), (ky * scale).unsqueeze(0))
    keep = (kx**2 + ky**2) * scale**2 <= (1.0 / resolution_a) ** 2
    flip = torch.sign(values) * keep
    return irfft2c(rfft2c(images.to(torch.float64)) * flip, n)


def contrast_score(
    images: Tensor,
    ctf: CtfParameters | None,
    pixel_size_a: float,
    particle_radius_px: float,
    resolution_a: float = 20.0,
) -> Tensor:
    """Per-image (mean inside the particle) - (mean of the background) after phase flipping."""
    n = images.shape[-1]
    if ctf is not None:
        filtered = phase_flipped_low_pass(images, ctf, pixel_size_a, resolution_a)
    else:
        filtered = images.to(torch.float64)
    inside = real_space_disc(n, 0.7 * particle_radius_px, device=images.device)
    outside = ~real_space_disc(n, particle_radius_px, device=images.device)
    return filtered[..., inside].mean(-1) - filtered[..., outside].mean(-1)


def normalise_images(
    images: Tensor, radius_px: float, noise_sigma: float, contrast_sign: int
) -> Tensor:
    """Subtract each image's background mean, divide by the noise sigma, apply the sign."""
    mean, _ = background_statistics(images, radius_px)
    return (images - mean[..., None, None]) * (contrast_sign / noise_sigma)
