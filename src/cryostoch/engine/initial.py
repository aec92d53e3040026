"""The starting density: the paper's random spheres (or a given map), band-limited and scaled.

The likelihood sees nothing beyond the cutoff, so content above it (sharp sphere edges) would
never change: the start is low-passed to the first stage's cutoff with a soft two-pixel edge
(detail above it would sit unconstrained while the cutoff is low and bias the poses once it
rises). Maps come in arbitrary units, so the start is scaled so that its CTF-modulated
projections carry the signal power measured in the (noise-normalised) images.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from cryostoch.engine.checks import read_init_map
from cryostoch.engine.prepare import PreparedRun
from cryostoch.engine.preprocess import PreparedParticles
from cryostoch.errors import InputError
from cryostoch.fourier.resample import soft_low_pass
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.simulate.init import random_spheres_volume

log = logging.getLogger(__name__)


def data_signal_power(model: MarginalLikelihood, particles: PreparedParticles,
                      noise_precision: Tensor | None = None) -> float:
    """Mean signal power per image inside the cutoff: E||I||^2 - E||noise||^2.

    White noise of sigma 1 has the power of the degrees of freedom; with `noise_precision`
    (G, M) per optics group (coloured noise), sum_k w_k sigma_k^2.
    """
    blocks = particles.blocks[:2000]
    coeffs = model.image_coefficients(blocks.to(model.device))
    power = (coeffs.real**2 + coeffs.imag**2).to(model.dtype) @ model.weights_k
    if noise_precision is None:
        return float(power.mean()) - model.coefficients.degrees_of_freedom
    variance = 1.0 / noise_precision[particles.optics_index[: blocks.shape[0]]]  # (B, M)
    return float(power.mean()) - float((variance @ model.weights_k).mean())


def model_signal_power(model: MarginalLikelihood, volume: Tensor,
                       particles: PreparedParticles) -> float:
    """Mean power of C * projection over directions and images, inside the cutoff.

    volume: (N, N, N) real.
    """
    with torch.no_grad():
        slices = model.slices(volume)
    mean_slice_power = (slices.abs() ** 2).mean(0)  # (M,), average over directions
    ctf = particles.ctf.index(torch.arange(min(len(particles), 500)))
    c2 = model.images.mean_ctf2(ctf).to(model.dtype)
    return float((model.weights_k * c2 * mean_slice_power).sum())


def _start_density(run: PreparedRun, generator: torch.Generator) -> Tensor:
    """(N, N, N) float64: random spheres from `generator`, or the --init map resampled."""
    config, box = run.config, run.geometry.box_size
    if config.init == "random":
        return random_spheres_volume(box, run.geometry.particle_radius_px, generator,
                                     dtype=torch.float64, device=run.device)
    volume = read_init_map(config.init, run.dataset.box_size, run.dataset.pixel_size_a, box)
    return volume.to(device=run.device, dtype=torch.float64)


def initial_volume(run: PreparedRun, band_limit_px: float,
                   noise_precision: Tensor | None = None) -> Tensor:
    """(N, N, N) start in the run's dtype, seeded by the run's seed; (K, N, N, N) with K
    classes (independent random starts, the first the same as a one-class run's).

    noise_precision: (G, M) at the final model's coefficients for coloured noise, or None.
    """
    config, model = run.config, run.model
    generator = torch.Generator().manual_seed(config.seed)
    target = data_signal_power(model, run.train, noise_precision)
    if target <= 0:
        log.warning("no signal power detected above the noise; using a unit-scale start")
        target = 0.01 * model.coefficients.degrees_of_freedom
    starts = []
    for c in range(config.classes):
        volume = _start_density(run, generator)
        if c > 0 and config.init != "random":
            # classes from one given map must differ, or they would stay identical
            noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64)
            volume = volume + 0.2 * float(volume.std()) * noise.to(volume.device)
        volume = run.symmetrize(soft_low_pass(volume, band_limit_px, 2.0, ndim=3)
                                ).to(model.dtype)
        predicted = model_signal_power(model, volume, run.train)
        if not predicted > 0:
            raise InputError(config.init, "the initial map has no density inside the cutoff")
        scale = math.sqrt(target / predicted)
        log.info("initial density scaled by %.4g to match the data's signal power", scale)
        starts.append(volume * scale)
    return starts[0] if config.classes == 1 else torch.stack(starts)
