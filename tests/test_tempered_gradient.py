"""The minibatch objective's gradient with tempering (likelihood_weight != 1) and a noise
sigma != 1, against central finite differences of its own value in float64.

tests/test_likelihood.py checks the gradient against autograd (sigma = 1, weight 1: its
reference energy has no 1/sigma^2) and against finite differences (sigma = 1, weight 1).
Here the noise sigma enters every energy as 1/sigma^2 and the weight multiplies the data term
(value and gradient) but not the prior, so a gradient that misses either factor, or applies the
weight to the prior too, disagrees with the finite differences of the value.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_ctf as ctf_batch
from cryostoch.fourier import fft3_grid
from cryostoch.geometry.quadrature import OrientationQuadrature
from cryostoch.geometry.rotations import euler_to_matrix
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig

F64 = torch.float64
N, K_TRAIN = 16, 7


# ---- the one place that builds a likelihood model and calls the objective ---------------------
def make_model(noise_sigma: float, shift_radius_px: float, one_pose: bool = False
               ) -> MarginalLikelihood:
    """A tiny quadrature (7 random directions x 5 in-plane angles x the shift grid); with
    one_pose, a single pose (a non-trivial rotation, no shift): then the data term is exactly
    quadratic in the volume."""
    if one_pose:
        mats = euler_to_matrix(torch.tensor([[30.0, 50.0, 0.0]], dtype=F64))
        orientations = OrientationQuadrature(
            directions=mats[:, 2, :], direction_weights=torch.ones(1, dtype=F64),
            direction_matrices=mats, inplane_angles_rad=torch.zeros(1, dtype=F64))
        cfg = LikelihoodConfig(box_size=N, pixel_size_a=4.0, max_radius_px=4.0,
                               noise_sigma=noise_sigma)
        return MarginalLikelihood(cfg, dtype=F64, orientations=orientations)
    g = torch.Generator().manual_seed(0)
    euler = torch.zeros(7, 3, dtype=F64)
    euler[:, 0] = 360 * torch.rand(7, generator=g, dtype=F64)
    euler[:, 1] = 180 * torch.rand(7, generator=g, dtype=F64)
    mats = euler_to_matrix(euler)
    weights = torch.rand(7, generator=g, dtype=F64) + 0.5
    orientations = OrientationQuadrature(
        directions=mats[:, 2, :], direction_weights=weights / weights.sum(),
        direction_matrices=mats,
        inplane_angles_rad=torch.arange(5, dtype=F64) * (2 * math.pi / 5))
    cfg = LikelihoodConfig(box_size=N, pixel_size_a=4.0, max_radius_px=4.0,
                           noise_sigma=noise_sigma, shift_radius_px=shift_radius_px,
                           shift_step_px=1.0, shift_sigma_px=1.5)
    return MarginalLikelihood(cfg, dtype=F64, orientations=orientations)


def objective(volume, blocks, ctf, model, prior, weight, gradient: bool):
    """(value, gradient or None) of the minibatch objective."""
    out = minibatch_objective(volume, blocks, ctf, model, prior, K_TRAIN,
                              compute_gradient=gradient, likelihood_weight=weight)
    return out.value, out.gradient


# ---- data -------------------------------------------------------------------------------------
def blob_volume(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z, y, x = fft3_grid(N)
    vol = torch.zeros(N, N, N, dtype=F64)
    for _ in range(4):
        c = (torch.rand(3, generator=g, dtype=F64) - 0.5) * N * 0.4
        s = 1.5 + 1.5 * torch.rand(1, generator=g, dtype=F64).item()
        vol += 0.3 * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol



@pytest.mark.parametrize(
    ("noise_sigma", "weight", "shift_radius_px"),
    [(1.7, 1.7**2, 1.5),  # annealing: sigma inflated by sqrt(T), weight T
     (0.6, 0.37, 1.5),  # sharper posterior, down-weighted data term
     (2.3, 3.1, 0.0)],  # no shift grid
)
def test_tempered_gradient_matches_finite_differences(noise_sigma, weight, shift_radius_px):
    model = make_model(noise_sigma, shift_radius_px)
    assert model.n_shifts > 1 or shift_radius_px == 0
    # mixed signs, but no voxel within 1e-3 of the prior's kink at 0; weak enough that the
    # pose posteriors are broad (the log-sum-exp's curvature matters)
    volume = blob_volume(1) - 0.05
    volume = torch.where(volume.abs() < 0.002, volume + 0.004, volume)
    assert float(volume.abs().min()) > 1e-3
    ctf = ctf_batch(3, 2)
    g = torch.Generator().manual_seed(3)
    images = noise_sigma * torch.randn(3, N, N, generator=g, dtype=F64)
    blocks = model.image_blocks(images)
    prior = PriorConfig(lambda_plus=0.4, lambda_minus=0.9)
    value, gradient = objective(volume, blocks, ctf, model, prior, weight, gradient=True)
    eps = 1e-5
    for _ in range(3):
        direction = torch.randn(volume.shape, generator=g, dtype=F64)
        plus, _ = objective(volume + eps * direction, blocks, ctf, model, prior, weight, False)
        minus, _ = objective(volume - eps * direction, blocks, ctf, model, prior, weight, False)
        numeric = float((plus - minus) / (2 * eps))
        analytic = float((gradient * direction).sum())
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9 * float(gradient.norm()))
    # the weight scales the data term only: value(w) - value(1) = (w - 1) * mean nll
    value_1, gradient_1 = objective(volume, blocks, ctf, model, prior, 1.0, gradient=True)
    none = PriorConfig(lambda_plus=0.0, lambda_minus=0.0)
    data_value, data_gradient = objective(volume, blocks, ctf, model, none, 1.0, gradient=True)
    assert float(value - value_1) == pytest.approx((weight - 1) * float(data_value), rel=1e-10)
    assert torch.allclose(gradient - gradient_1, (weight - 1) * data_gradient, rtol=1e-9,
                          atol=1e-12 * float(data_gradient.abs().max()))


def test_annealing_keeps_the_data_curvature():
    """objective.py: a model with noise sigma * sqrt(T) and likelihood_weight T has the data
    term's curvature of (sigma, weight 1). With one pose the data term is exactly quadratic, so
    gradient differences along any direction must agree; a 1/sigma^2 missing from both value
    and gradient (which finite differences cannot see) changes them by a factor T."""
    sigma, temperature = 1.3, 4.0
    plain = make_model(sigma, 0.0, one_pose=True)
    hot = make_model(sigma * math.sqrt(temperature), 0.0, one_pose=True)
    ctf = ctf_batch(2, 5)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, N, N, generator=g, dtype=F64)
    volume = blob_volume(7)
    step = torch.randn(volume.shape, generator=g, dtype=F64)
    none = PriorConfig(lambda_plus=0.0, lambda_minus=0.0)

    def curvature_along(model, weight):
        blocks = model.image_blocks(images)
        _, g0 = objective(volume, blocks, ctf, model, none, weight, gradient=True)
        _, g1 = objective(volume + step, blocks, ctf, model, none, weight, gradient=True)
        return g1 - g0

    reference = curvature_along(plain, 1.0)
    assert float((reference * step).sum()) > 0
    tempered = curvature_along(hot, temperature)
    assert torch.allclose(tempered, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    # and without the weight the curvature is T times smaller
    untempered = curvature_along(hot, 1.0)
    assert torch.allclose(untempered * temperature, reference, rtol=1e-9,
                          atol=1e-12 * float(reference.abs().max()))
