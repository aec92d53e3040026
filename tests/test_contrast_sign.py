"""Contrast-sign detection (`estimate_normalisation`, `contrast_score`) on simulated particles:
protein white as simulated, and the same images inverted, with and without a CTF. The
detected sign must be the true one in all four cases, and the noise sigma must be the one
added (the images are deliberately not in units of the noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryostoch.engine.preprocess import estimate_normalisation
from cryostoch.model.preprocess import contrast_score
from cryostoch.simulate import (
    DefaultCtf,
    ProjectionModel,
    draw_particle_parameters,
    phantom_radius_a,
    phantom_volume,
)

BOX, PIXEL = 32, 10.0  # the phantom (radius about 112 A, 11 px) with a background ring
N_IMAGES, NOISE_SIGMA, SNR = 120, 2.5, 0.05


class InMemoryDataset:
    """What estimate_normalisation reads from a ParticleDataset: len, read_images, ctf,
    pixel_size_a, source_path."""

    def __init__(self, images: torch.Tensor, ctf, pixel_size_a: float):
        self.images, self.ctf, self.pixel_size_a = images, ctf, pixel_size_a
        self.source_path = Path("in-memory")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read_images(self, rows) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(rows), dtype=torch.long)].float()


@pytest.fixture(scope="module")
def clean_particles():
    """Noise-free images with and without the CTF (protein white), and their parameters."""
    params = draw_particle_parameters(N_IMAGES, DefaultCtf(), seed=5, shift_sigma_px=0.7)
    model = ProjectionModel(phantom_volume(BOX, PIXEL), PIXEL)
    with_ctf = model.images(params.rotations, params.ctf, params.shifts_px)
    without = model.images(params.rotations, None, params.shifts_px)
    return params, with_ctf, without


def noisy(clean: torch.Tensor, seed: int) -> torch.Tensor:
    """Scale to the SNR (signal variance / noise variance) and add white noise of NOISE_SIGMA."""
    scale = NOISE_SIGMA * (SNR / clean.var(dim=(-2, -1), unbiased=False).mean()).sqrt()
    g = torch.Generator().manual_seed(seed)
    return clean * scale + NOISE_SIGMA * torch.randn(clean.shape, generator=g, dtype=clean.dtype)


@pytest.mark.parametrize("use_ctf", [True, False], ids=["ctf", "no-ctf"])
@pytest.mark.parametrize("true_sign", [1, -1], ids=["white", "inverted"])
def test_detected_contrast_sign_is_the_true_one(clean_particles, use_ctf, true_sign):
    params, with_ctf, without = clean_particles
    images = true_sign * noisy(with_ctf if use_ctf else without, seed=7)
    ctf = params.ctf if use_ctf else None
    radius_px = phantom_radius_a(PIXEL) / PIXEL
    assert radius_px < BOX / 2 - 2
    stats = estimate_normalisation(InMemoryDataset(images, ctf, PIXEL), radius_px,
                                   generator=torch.Generator().manual_seed(0))
    assert stats.contrast_sign == true_sign
    assert np.sign(stats.sign_score) == true_sign
    assert stats.noise_sigma == pytest.approx(NOISE_SIGMA, rel=0.05)
    # per image: the phase-flipped (or plain) score has the true sign for most particles
    scores = contrast_score(images, ctf, PIXEL, radius_px)
    assert float((torch.sign(scores) == true_sign).double().mean()) > 0.7
    # forcing the sign overrides the detection
    forced = estimate_normalisation(InMemoryDataset(images, ctf, PIXEL), radius_px,
                                    generator=torch.Generator().manual_seed(0), invert=True)
    assert forced.contrast_sign == -1
