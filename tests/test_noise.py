"""The background noise-spectrum estimate against noise of a known spectrum."""

import torch

from cryostoch.fourier.grids import radial_index
from cryostoch.fourier.transforms import irfft2c, rfft2c
from cryostoch.model.noise import (
    NoiseSpectrum,
    background_power,
    soft_background_mask,
    spectrum_from_background,
)
from cryostoch.model.preprocess import background_statistics

N, RADIUS = 48, 18.0


def estimate(images: torch.Tensor) -> torch.Tensor:
    """The engine's estimate: background mean removed, masked, shell power per image."""
    mean, _ = background_statistics(images, RADIUS)
    images = images - mean[:, None, None]
    mask = soft_background_mask(N, RADIUS)
    power, counts = background_power(images, mask)
    n = torch.tensor([float(images.shape[0])])
    return spectrum_from_background(power.sum(0, keepdim=True), counts, n, mask)[0]


def test_white_noise_gives_a_flat_spectrum_in_every_shell():
    g = torch.Generator().manual_seed(0)
    found = estimate(torch.randn(1500, N, N, generator=g, dtype=torch.float64))
    assert torch.allclose(found, torch.ones_like(found), atol=0.05), found


def test_coloured_noise_spectrum_is_recovered_shell_by_shell():
    """Noise made by filtering white noise with sqrt(S(k)) for a falling S (4x at low
    frequencies); the estimate follows S within 12% from shell 2 on (the mask blurs it over
    about a shell, so the steepest part is allowed a little more)."""
    g = torch.Generator().manual_seed(1)
    shells = radial_index(N, half=True, ndim=2).double()
    spectrum = 1.0 + 3.0 * torch.exp(-((shells / 6.0) ** 2))
    white = torch.randn(1500, N, N, generator=g, dtype=torch.float64)
    images = irfft2c(rfft2c(white) * spectrum.sqrt(), N)
    found = estimate(images)
    expected = 1.0 + 3.0 * torch.exp(-((torch.arange(N // 2 + 1).double() / 6.0) ** 2))
    ratio = found[2:] / expected[2:]
    assert bool(((ratio > 0.88) & (ratio < 1.12)).all()), ratio


def test_precision_looks_up_each_coefficients_shell():
    from cryostoch.fourier.grids import half_plane_coefficients

    variance = torch.tensor([[1.0, 2.0, 4.0, 8.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    coefficients = half_plane_coefficients(16, 3.0)
    precision = NoiseSpectrum(variance).precision(coefficients, torch.float64)  # (G, M)
    radius = torch.sqrt(coefficients.kx**2 + coefficients.ky**2).round().long()
    assert torch.equal(precision[0], 1.0 / variance[0][radius])
    assert torch.equal(precision[1], torch.ones_like(precision[1]))
