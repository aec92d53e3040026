"""The marginal likelihood engine against autograd, finite differences and real-space sums."""

import math

import pytest
import torch

from conftest import random_ctf as ctf_batch
from cryostoch.fourier import (
    PrunedDft,
    SpectrumLayout,
    fft2_grid,
    fft2c,
    fft3_grid,
    ifft2c,
)
from cryostoch.geometry.quadrature import (
    OrientationQuadrature,
    ShiftQuadrature,
    orientation_quadrature,
)
from cryostoch.geometry.rotations import euler_to_matrix, random_rotations
from cryostoch.model.hard_assignment import best_poses, hard_statistics
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig, negative_log_prior
from cryostoch.operators import evaluate_ctf, extract_slices
from cryostoch.operators.inplane import hermitian_extend, sample_blocks

F64 = torch.float64


def blob_volume(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z, y, x = fft3_grid(n)
    vol = torch.zeros(n, n, n, dtype=F64)
    for _ in range(5):
        c = (torch.rand(3, generator=g, dtype=F64) - 0.5) * n * 0.45
        s = 1.0 + torch.rand(1, generator=g, dtype=F64).item() * n / 16
        vol += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def small_orientations(n_directions: int, n_inplane: int, seed: int) -> OrientationQuadrature:
    g = torch.Generator().manual_seed(seed)
    mats = random_rotations(n_directions, g)
    euler = torch.zeros(n_directions, 3, dtype=F64)
    # psi = 0 rotations for the directions: keep rot and tilt of random rotations
    from cryostoch.geometry.rotations import matrix_to_euler

    euler[:, :2] = matrix_to_euler(mats)[:, :2]
    direction_mats = euler_to_matrix(euler)
    directions = direction_mats[:, 2, :]  # A^T e_z
    weights = torch.rand(n_directions, generator=g, dtype=F64) + 0.5
    return OrientationQuadrature(
        directions=directions,
        direction_weights=weights / weights.sum(),
        direction_matrices=direction_mats,
        inplane_angles_rad=torch.arange(n_inplane, dtype=F64) * (2 * math.pi / n_inplane),
    )



def simulate(volume, rotations, shifts_px, ctf, pixel_size_a, noise, seed):
    """Independent forward model: exact slices at the image's own grid, CTF, shift, noise."""
    n = volume.shape[-1]
    layout = SpectrumLayout(n, n / 2 * 1.5, 4)
    block = PrunedDft.create(layout, dtype=F64).volume(volume)
    ky, kx = fft2_grid(n)
    images = []
    for i, a in enumerate(rotations):
        proj = extract_slices(block, a[None], kx.reshape(-1), ky.reshape(-1), 4)[0]
        proj = proj.reshape(n, n) * math.sqrt(n)
        c = evaluate_ctf(ctf.index([i]), (kx / (n * pixel_size_a))[None],
                         (ky / (n * pixel_size_a))[None])[0]
        t = shifts_px[i]
        phase = torch.polar(torch.ones_like(kx), -2 * math.pi * (kx * t[0] + ky * t[1]) / n)
        images.append(ifft2c(proj * c * phase).real)
    g = torch.Generator().manual_seed(seed)
    images = torch.stack(images)
    return images + noise * torch.randn(images.shape, generator=g, dtype=F64)


def make_model(n=16, radius=4.0, n_dir=6, n_inplane=5, shift_radius=0.0, seed=0, **kw):
    cfg = LikelihoodConfig(box_size=n, pixel_size_a=4.0, max_radius_px=radius,
                           shift_radius_px=shift_radius, shift_step_px=1.0, shift_sigma_px=1.5,
                           **kw)
    return MarginalLikelihood(cfg, dtype=F64, orientations=small_orientations(n_dir, n_inplane,
                                                                              seed))


def reference_nll(model: MarginalLikelihood, volume, blocks, ctf, precision=None,
                  log_joint=False):
    """The same objective written directly with autograd-friendly tensor ops (no chunking).

    precision: optional (B, M) per-coefficient 1 / sigma^2 (coloured noise): the Gaussian's
    quadratic form weights coefficient k of image i by w_k precision_ik and its normaliser is
    sum_k w_k log(2 pi / precision_ik) / 2. With log_joint: the (B, P, T, D) log prior plus
    log likelihood of every pose instead."""
    b = blocks.shape[0]
    weights = model.weights_k.expand(b, -1) if precision is None \
        else model.weights_k * precision  # (B, M)
    s = model.slices(volume)  # (D, M)
    full = hermitian_extend(blocks)
    x = sample_blocks(full, model.images.interpolation, (model.n_inplane, model.n_points))
    c = evaluate_ctf(ctf, model.images.rotated_freq_x_per_a,
                     model.images.rotated_freq_y_per_a)
    xt = x.unsqueeze(2) * model.images.unshift.unsqueeze(0)  # (B, P, T, M)
    model_pd = c.unsqueeze(2).unsqueeze(-1) * s.T[None, None, None]  # (B, P, 1, M, D)
    # residual over (B, P, T, M, D)
    resid = xt.unsqueeze(-1) - model_pd
    energy = 0.5 * (weights[:, None, None, :, None] * resid.abs() ** 2).sum(-2)  # (B, P, T, D)
    # the engine uses the exact ||I||^2 on the DFT grid for every angle (a rotation of the
    # disc leaves it unchanged) rather than the norm of the interpolated samples
    interpolated_norm = 0.5 * (weights[:, None, None] * xt.abs() ** 2).sum(-1, keepdim=True)
    coeffs = model.image_coefficients(blocks)
    exact_norm = 0.5 * (weights * coeffs.abs() ** 2).sum(-1).reshape(-1, 1, 1, 1)
    energy = energy - interpolated_norm + exact_norm
    logw = model.log_weights_pd.unsqueeze(1) + model.log_weights_t.reshape(1, -1, 1)
    if log_joint:
        return logw.unsqueeze(0) - energy  # (B, P, T, D)
    lse = torch.logsumexp((logw.unsqueeze(0) - energy).reshape(blocks.shape[0], -1), dim=1)
    if precision is None:
        return -lse + model.log_normaliser
    return -lse + 0.5 * (model.weights_k * torch.log(2 * math.pi / precision)).sum(-1)


@pytest.mark.parametrize("coloured", [False, True])
@pytest.mark.parametrize("shift_radius", [0.0, 1.5])
def test_nll_and_gradient_match_autograd_reference(shift_radius, coloured):
    """White noise, and coloured noise given as a (B, M) per-coefficient precision."""
    model = make_model(shift_radius=shift_radius)
    volume = blob_volume(16, 1)
    ctf = ctf_batch(4, 2)
    g = torch.Generator().manual_seed(3)
    blocks = model.image_blocks(torch.randn(4, 16, 16, generator=g, dtype=F64))
    precision = 0.3 + 2 * torch.rand(4, model.n_points, generator=g, dtype=F64) \
        if coloured else None
    v = volume.clone().requires_grad_(True)
    ref = reference_nll(model, v, blocks, ctf, precision)
    (ref_grad,) = torch.autograd.grad(ref.mean(), v)
    prior = PriorConfig(lambda_plus=0.0, lambda_minus=0.0)
    out = minibatch_objective(volume, blocks, ctf, model, prior, n_training_images=10,
                              noise_precision=precision)
    assert torch.allclose(out.likelihood.nll, ref.detach(), rtol=1e-10, atol=1e-9)
    assert torch.allclose(out.gradient, ref_grad, rtol=1e-8, atol=1e-10)


def test_flat_noise_precision_is_white_noise_of_that_sigma():
    model = make_model(shift_radius=1.5)
    white = make_model(shift_radius=1.5, noise_sigma=0.8)
    volume = blob_volume(16, 2)
    ctf = ctf_batch(3, 4)
    g = torch.Generator().manual_seed(5)
    blocks = model.image_blocks(torch.randn(3, 16, 16, generator=g, dtype=F64))
    flat = torch.full((model.n_points,), 1 / 0.8**2, dtype=F64)
    a = model.evaluate(model.slices(volume), blocks, ctf, noise_precision=flat)
    b = white.evaluate(white.slices(volume), blocks, ctf)
    assert torch.allclose(a.nll, b.nll, rtol=1e-12)


def test_gradient_matches_finite_differences_with_prior():
    model = make_model(shift_radius=1.0)
    volume = blob_volume(16, 4) - 0.1
    ctf = ctf_batch(3, 5)
    g = torch.Generator().manual_seed(6)
    blocks = model.image_blocks(torch.randn(3, 16, 16, generator=g, dtype=F64))
    prior = PriorConfig(lambda_plus=0.3, lambda_minus=0.7)
    out = minibatch_objective(volume, blocks, ctf, model, prior, n_training_images=5)
    direction = torch.randn(volume.shape, generator=g, dtype=F64)
    eps = 1e-5

    def f(v):
        return minibatch_objective(v, blocks, ctf, model, prior, 5, compute_gradient=False).value

    numeric = (f(volume + eps * direction) - f(volume - eps * direction)) / (2 * eps)
    analytic = (out.gradient * direction).sum()
    assert numeric.item() == pytest.approx(analytic.item(), rel=1e-6)


def test_chunking_does_not_change_results():
    model = make_model(n_dir=9, shift_radius=1.5)
    tiny = make_model(n_dir=9, shift_radius=1.5, memory_budget_mb=0.002)
    assert tiny.kernel.chunk_sizes(5)[1] < model.n_directions
    volume = blob_volume(16, 7)
    ctf = ctf_batch(5, 8)
    g = torch.Generator().manual_seed(9)
    blocks = model.image_blocks(torch.randn(5, 16, 16, generator=g, dtype=F64))
    a = model.evaluate(model.slices(volume), blocks, ctf, gradient_scale=0.2, statistics=True)
    b = tiny.evaluate(tiny.slices(volume), blocks, ctf, gradient_scale=0.2, statistics=True)
    assert torch.allclose(a.nll, b.nll)
    assert torch.equal(a.best_pose_index, b.best_pose_index)
    assert torch.allclose(a.slice_gradient, b.slice_gradient)
    assert torch.allclose(a.statistics[0], b.statistics[0])


@pytest.mark.parametrize("budget_mb", [512.0, 0.002])
def test_top_poses_are_the_most_probable_points_of_the_direct_posterior(budget_mb):
    """The K best poses and their probabilities equal those of the posterior written out
    directly (every pose's energy, no chunking), in one pass and over direction chunks."""
    model = make_model(n_dir=9, shift_radius=1.5, memory_budget_mb=budget_mb)
    volume = blob_volume(16, 3)
    ctf = ctf_batch(4, 5)
    rotations = random_rotations(4, torch.Generator().manual_seed(11)).to(F64)
    images = simulate(volume, rotations, torch.zeros(4, 2, dtype=F64), ctf, 4.0, 0.5, 3)
    blocks = model.image_blocks(images)
    result = model.evaluate(model.slices(volume), blocks, ctf, top_k=6)
    joint = reference_nll(model, volume, blocks, ctf, log_joint=True)  # (B, P, T, D)
    flat = joint.permute(0, 3, 1, 2).reshape(4, -1)  # the engine's (d * P + p) * T + t
    posterior = torch.softmax(flat, dim=1)
    expected_prob, expected_index = posterior.topk(6, dim=1)
    assert torch.equal(result.top_pose_index, expected_index)
    assert torch.allclose(result.top_pose_probability, expected_prob, rtol=1e-9, atol=1e-12)
    assert torch.equal(result.best_pose_index, expected_index[:, 0])


def test_one_point_quadrature_equals_real_space_conditional_likelihood():
    """With R = I, psi = 0, t = 0 the marginal is the conditional Gaussian likelihood, and the
    Fourier-space quadratic form equals the real-space ||I - model||^2 / (2 sigma^2) of the
    band-limited images."""
    n, radius, sigma = 16, 5.0, 1.7
    ident = OrientationQuadrature(
        directions=torch.tensor([[0.0, 0.0, 1.0]], dtype=F64),
        direction_weights=torch.ones(1, dtype=F64),
        direction_matrices=torch.eye(3, dtype=F64)[None],
        inplane_angles_rad=torch.zeros(1, dtype=F64),
    )
    one_shift = ShiftQuadrature(shifts_px=torch.zeros(1, 2, dtype=F64),
                                log_weights=torch.zeros(1, dtype=F64))
    cfg = LikelihoodConfig(box_size=n, pixel_size_a=3.0, max_radius_px=radius, noise_sigma=sigma)
    model = MarginalLikelihood(cfg, dtype=F64, orientations=ident, shifts=one_shift)
    volume = blob_volume(n, 11)
    ctf = ctf_batch(2, 12)
    g = torch.Generator().manual_seed(13)
    images = torch.randn(2, n, n, generator=g, dtype=F64) * sigma
    out = model.evaluate(model.slices(volume), model.image_blocks(images), ctf)

    # real space: projection along z of the voxels, CTF applied and band-limited with full FFTs
    ky, kx = fft2_grid(n)
    disc = (kx**2 + ky**2 <= radius**2)
    proj = volume.sum(0)
    c = evaluate_ctf(ctf, (kx / (n * 3.0))[None], (ky / (n * 3.0))[None])
    model_img = ifft2c(fft2c(proj)[None] * c * disc).real
    data_img = ifft2c(fft2c(images) * disc).real
    quadratic = ((data_img - model_img) ** 2).sum((-2, -1)) / (2 * sigma**2)
    dof = int(disc.sum())
    expected = quadratic + 0.5 * dof * math.log(2 * math.pi * sigma**2)
    assert torch.allclose(out.nll, expected, rtol=1e-10)


def test_ground_truth_beats_random_map_and_posterior_peaks_at_true_pose():
    n, radius = 24, 6.0
    orientations = orientation_quadrature(radius, dtype=F64)
    cfg = LikelihoodConfig(box_size=n, pixel_size_a=4.0, max_radius_px=radius,
                           volume_oversampling=3, image_oversampling=3,
                           shift_radius_px=2.0, shift_step_px=1.0)
    model = MarginalLikelihood(cfg, dtype=F64, orientations=orientations)
    truth = blob_volume(n, 21) * 3
    g = torch.Generator().manual_seed(22)
    n_images = 12
    true_index = torch.randint(0, model.quadrature_size, (n_images,), generator=g)
    euler, shifts = model.pose_parameters(true_index)
    rotations = euler_to_matrix(euler)
    ctf = ctf_batch(n_images, 23)
    images = simulate(truth, rotations, shifts, ctf, 4.0, noise=0.05, seed=24)
    blocks = model.image_blocks(images)
    prior = PriorConfig()
    at_truth = minibatch_objective(truth, blocks, ctf, model, prior, 100, compute_gradient=False)
    random_map = blob_volume(n, 99) * 3
    at_random = minibatch_objective(random_map, blocks, ctf, model, prior, 100,
                                    compute_gradient=False)
    assert at_truth.value < at_random.value
    found = at_truth.likelihood.best_pose_index
    assert (found == true_index).float().mean() >= 0.9
    assert at_truth.likelihood.best_pose_probability.median() > 0.5


def test_prior_matches_definition():
    v = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=F64)
    p = PriorConfig(lambda_plus=0.1, lambda_minus=2.0, beta=2.0)
    expected = 0.1 * 4.0 + 2.0 * (4.0 + 0.25)
    assert negative_log_prior(v, p).item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        PriorConfig(lambda_plus=-1)


def test_best_poses_and_hard_statistics_recover_true_poses():
    n, radius = 24, 6.0
    cfg = LikelihoodConfig(box_size=n, pixel_size_a=4.0, max_radius_px=radius,
                           volume_oversampling=3, image_oversampling=3,
                           shift_radius_px=2.0, shift_step_px=1.0)
    model = MarginalLikelihood(cfg, dtype=F64)
    truth = blob_volume(n, 31) * 3
    g = torch.Generator().manual_seed(32)
    true_index = torch.randint(0, model.quadrature_size, (10,), generator=g)
    euler, shifts = model.pose_parameters(true_index)
    ctf = ctf_batch(10, 33)
    images = simulate(truth, euler_to_matrix(euler), shifts, ctf, 4.0, noise=0.02, seed=34)
    blocks = model.image_blocks(images)
    slices = model.slices(truth)
    found, _ = best_poses(model, slices, blocks, ctf, score="correlation")
    assert (found == true_index).float().mean() >= 0.9
    # one-hot statistics equal the soft ones when the posterior is a point mass
    num, den = hard_statistics(model, blocks, ctf, found)
    soft = model.evaluate(slices, blocks, ctf, statistics=True)
    assert soft.best_pose_probability.min() > 0.999
    assert (num - soft.statistics[0]).norm() <= 1e-4 * soft.statistics[0].norm()
    assert (den - soft.statistics[1]).norm() <= 1e-4 * soft.statistics[1].norm()


def test_prior_value_and_gradient_together():
    from cryostoch.model.prior import negative_log_prior_and_gradient

    g = torch.Generator().manual_seed(5)
    v = torch.randn(6, 6, 6, generator=g, dtype=F64)
    for beta in (1.0, 2.0):
        p = PriorConfig(lambda_plus=0.3, lambda_minus=1.7, beta=beta)
        value, grad = negative_log_prior_and_gradient(v, p)
        vv = v.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(negative_log_prior(vv, p), vv)
        assert value.item() == pytest.approx(negative_log_prior(v, p).item())
        assert torch.allclose(grad, auto)


def test_classes_marginalise_like_a_mixture_of_single_class_models():
    """With K maps, p(I) = sum_c pi_c p(I | V_c): the class is one more latent variable."""
    single = make_model(shift_radius=1.0)
    mixed = make_model(shift_radius=1.0, n_classes=2)
    volumes = torch.stack([blob_volume(16, 1), 0.5 * blob_volume(16, 8)])
    ctf = ctf_batch(4, 3)
    g = torch.Generator().manual_seed(4)
    blocks = single.image_blocks(torch.randn(4, 16, 16, generator=g, dtype=F64))
    log_pi = torch.log(torch.tensor([0.3, 0.7], dtype=F64))
    per_class = torch.stack([single.evaluate(single.slices(v), blocks, ctf).nll for v in volumes])
    expected = -torch.logsumexp(log_pi[:, None] - per_class, dim=0)
    result, gradient = mixed.nll_and_gradient(volumes, blocks, ctf, gradient_scale=1.0,
                                              class_log_weights=log_pi)
    assert torch.allclose(result.nll, expected, rtol=1e-11)
    assert gradient.shape == volumes.shape
    # the gradient against central finite differences along a random direction
    direction = torch.randn(volumes.shape, generator=g, dtype=F64)
    eps = 1e-5

    def total(v):
        return mixed.evaluate(mixed.slices(v), blocks, ctf, class_log_weights=log_pi).nll.sum()

    numeric = (total(volumes + eps * direction) - total(volumes - eps * direction)) / (2 * eps)
    assert float(numeric) == pytest.approx(float((gradient * direction).sum()), rel=1e-6)
    # the best pose names its class; pose parameters are those of the direction within it
    classes = mixed.class_of(result.best_pose_index)
    assert set(classes.tolist()) <= {0, 1}
    euler, _ = mixed.pose_parameters(result.best_pose_index)
    assert euler.shape == (4, 3)


def test_posterior_residual_power_matches_a_direct_sum():
    """The noise update's sum_i E_r |y - C S|^2 per coefficient, from the EM sums, against the
    same expectation written out over every quadrature point (coloured precision)."""
    from cryostoch.model.noise import residual_power

    model = make_model(shift_radius=1.5)
    volume = blob_volume(16, 3)
    ctf = ctf_batch(3, 6)
    g = torch.Generator().manual_seed(7)
    blocks = model.image_blocks(torch.randn(3, 16, 16, generator=g, dtype=F64))
    precision = 0.5 + torch.rand(model.n_points, generator=g, dtype=F64)  # (M,), one group
    s = model.slices(volume)
    result = model.evaluate(s, blocks, ctf, statistics=True, noise_precision=precision)
    # direct: posterior over (B, P, T, D) from the same energies as reference_nll
    x = sample_blocks(hermitian_extend(blocks), model.images.interpolation,
                      (model.n_inplane, model.n_points))
    c = evaluate_ctf(ctf, model.images.rotated_freq_x_per_a, model.images.rotated_freq_y_per_a)
    y = x.unsqueeze(2) * model.images.unshift.unsqueeze(0)  # (B, P, T, M)
    resid = y.unsqueeze(-1) - c.unsqueeze(2).unsqueeze(-1) * s.T[None, None, None]
    weights = model.weights_k * precision
    energy = 0.5 * (weights[:, None] * resid.abs() ** 2).sum(-2)  # (B, P, T, D)
    energy = energy - 0.5 * (weights * y.abs() ** 2).sum(-1, keepdim=True)  # exact-norm form
    logw = model.log_weights_pd.unsqueeze(1) + model.log_weights_t.reshape(1, -1, 1)
    r = torch.softmax((logw.unsqueeze(0) - energy).reshape(3, -1), dim=1).reshape(energy.shape)
    direct = (r.unsqueeze(-2) * resid.abs() ** 2).sum((0, 1, 2, 4))  # (M,)
    image_power = (r.sum(-1).unsqueeze(-1) * y.abs() ** 2).sum((0, 1, 2))
    data_sums, ctf2_sums = result.statistics
    found = residual_power(s, data_sums, ctf2_sums, image_power, weights)
    assert torch.allclose(found, direct, rtol=1e-9)
