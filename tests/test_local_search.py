"""Local pose search and its back-projection (model/local_search.py), against the simulator's
independent image formation and the truth."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import random_ctf

from cryostoch.baselines.reconstruct_map import (
    backprojection_grid_shape,
    gridded_backprojection,
    solve_map,
)
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.fourier.grids import half_plane_coefficients
from cryostoch.fourier.resample import low_pass
from cryostoch.fourier.spectrum import SpectrumLayout, oversampled_volume_spectrum
from cryostoch.geometry.rotations import random_rotations
from cryostoch.model.local_search import (
    ImageBatch,
    backproject_local,
    best_of_starts,
    candidate_rotations,
    local_scores,
    oversampled_candidates,
    posterior_spread,
    rotation_offsets,
    scale_estimate,
    shift_offsets,
)
from cryostoch.operators.ctf import CtfParameters, evaluate_ctf
from cryostoch.simulate.particles import ProjectionModel

N = 24


def blob_volume(seed: int = 0, n: int = N) -> torch.Tensor:
    """A few Gaussian blobs, asymmetric, inside the box (float64)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros(n, n, n, dtype=torch.float64)
    for _ in range(6):
        c = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * n * 0.4
        width = 1.5 + 2 * float(torch.rand(1, generator=g))
        volume += torch.exp(-((x - c[0])**2 + (y - c[1])**2 + (z - c[2])**2) / (2 * width**2))
    return volume


def images_at(volume: torch.Tensor, rotations, shifts, ctf: CtfParameters, radius: float):
    """ImageBatch of noise-free images made by the simulator, at the half-plane points."""
    sim = ProjectionModel(volume, 3.0)
    spectra = sim.spectra(rotations, ctf, shifts)  # at the simulator's rfft points
    points = half_plane_coefficients(N, radius)
    sim_points = zip(sim.kx.tolist(), sim.ky.tolist(), strict=True)
    lookup = {(int(a), int(b)): i for i, (a, b) in enumerate(sim_points)}
    wanted = zip(points.kx.tolist(), points.ky.tolist(), strict=True)
    pick = torch.tensor([lookup[(int(a), int(b))] for a, b in wanted])
    scale = 1.0 / (N * 3.0)
    c = evaluate_ctf(ctf, (points.kx * scale)[None], (points.ky * scale)[None])
    weighted = points.weights.expand(len(rotations), -1).clone()
    return points, ImageBatch(spectra[:, pick], c, weighted)


def test_offsets_are_small_rotations_and_shifts_identity_first():
    rot = rotation_offsets(math.radians(2.0), 1)
    assert rot.shape == (27, 3, 3)
    assert torch.allclose(rot[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(27, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-12)
    angles = torch.acos(((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert float(angles.max()) <= math.radians(2.0) * math.sqrt(3) + 1e-9
    shifts = shift_offsets(0.5, 1)
    assert shifts.shape == (9, 2) and float(shifts[0].abs().sum()) == 0
    assert float(shifts.abs().max()) == 0.5


def test_local_logits_equal_the_direct_gaussian_energy():
    """logit = -1/2 ||X - C S(t)||^2_wp + 1/2 ||X||^2_wp + log prior, with S(t) made by the
    simulator at the candidate pose (the shift applied to the model, not undone on the
    image)."""
    volume = blob_volume(1)
    g = torch.Generator().manual_seed(3)
    true_rot = random_rotations(3, generator=g, dtype=torch.float64)
    ctf = random_ctf(3, 5)
    radius = 9.0
    points, batch = images_at(volume, true_rot, torch.zeros(3, 2, dtype=torch.float64), ctf,
                              radius)
    noise = torch.randn(batch.coefficients.shape, generator=g, dtype=torch.complex128)
    batch = ImageBatch(batch.coefficients + noise, batch.ctf, batch.weighted_precision * 0.7)
    offsets = rotation_offsets(math.radians(4.0), 1)
    cands = candidate_rotations(true_rot, offsets)  # (3, 27, 3, 3)
    cand_shifts = torch.tensor([[0.0, 0.0], [1.5, -0.5]], dtype=torch.float64).expand(3, 2, 2)
    prior = torch.tensor([[0.0, -0.3]], dtype=torch.float64).expand(3, 2)
    block, _ = oversampled_volume_spectrum(volume, radius + 0.5, 2)
    scores = local_scores(block, 2, points.kx, points.ky, N, batch, cands, cand_shifts, prior)
    for i in range(3):
        for j in (0, 5, 26):
            for s in range(2):
                _, model = images_at(volume, cands[i, j][None], cand_shifts[i, s][None],
                                     ctf.index([i]), radius)
                residual = batch.coefficients[i] - model.coefficients[0]
                wp = batch.weighted_precision[i]
                direct = (-0.5 * (wp * residual.abs()**2).sum()
                          + 0.5 * (wp * batch.coefficients[i].abs()**2).sum() + prior[i, s])
                assert torch.allclose(scores.logits[i, j, s], direct, rtol=1e-6, atol=1e-6)


def test_local_search_finds_the_true_pose_one_step_away():
    """Images at known poses; each search starts one grid step off in rotation and shift, so
    the truth is one of the candidates and must be the most probable one."""
    volume = blob_volume(2)
    g = torch.Generator().manual_seed(7)
    n_images = 12
    true_rot = random_rotations(n_images, generator=g, dtype=torch.float64)
    true_shift = (torch.rand(n_images, 2, generator=g, dtype=torch.float64) - 0.5) * 4
    ctf = random_ctf(n_images, 11)
    radius = 10.0
    points, batch = images_at(volume, true_rot, true_shift, ctf, radius)
    offsets = rotation_offsets(math.radians(3.0), 1)
    t_offsets = shift_offsets(0.75, 1)
    k = torch.randint(1, 27, (n_images,), generator=g)
    s = torch.randint(1, 9, (n_images,), generator=g)
    start_rot = true_rot @ offsets[k].transpose(1, 2)  # so that start @ offsets[k] = truth
    start_shift = true_shift - t_offsets[s]
    cands = candidate_rotations(start_rot, offsets)
    cand_shifts = start_shift.unsqueeze(1) + t_offsets
    block, _ = oversampled_volume_spectrum(volume, radius + 0.5, 2)
    scores = local_scores(block, 2, points.kx, points.ky, N, batch, cands, cand_shifts,
                          torch.zeros(n_images, 9, dtype=torch.float64))
    best = scores.logits.flatten(1).argmax(1)
    assert torch.equal(best // 9, k)
    assert torch.equal(best % 9, s)


def test_best_of_starts_finds_the_truth_among_wrong_starts():
    """Noisy images at known poses; each has 4 starts, one a grid step off the truth in
    rotation and shift (at a random position among them), the others random poses. The start
    chosen must be the near one, with the truth its best candidate; each start's evidence
    must equal the log-sum of its own window scored alone, image by image."""
    volume = blob_volume(4)
    g = torch.Generator().manual_seed(9)
    n_images, n_starts = 8, 4
    true_rot = random_rotations(n_images, generator=g, dtype=torch.float64)
    true_shift = (torch.rand(n_images, 2, generator=g, dtype=torch.float64) - 0.5) * 4
    ctf = random_ctf(n_images, 13)
    radius = 10.0
    points, clean = images_at(volume, true_rot, true_shift, ctf, radius)
    noise = torch.randn(clean.coefficients.shape, generator=g, dtype=torch.float64)
    batch = ImageBatch(clean.coefficients + 0.05 * clean.coefficients.abs().mean() * noise,
                       clean.ctf, clean.weighted_precision)
    step, shift_step = math.radians(3.0), 0.75
    offsets, t_offsets = rotation_offsets(step, 1), shift_offsets(shift_step, 1)
    k = torch.randint(1, 27, (n_images,), generator=g)
    s = torch.randint(1, 9, (n_images,), generator=g)
    starts = random_rotations(n_images * n_starts, generator=g,
                              dtype=torch.float64).view(n_images, n_starts, 3, 3)
    start_shifts = (torch.rand(n_images, n_starts, 2, generator=g, dtype=torch.float64)
                    - 0.5) * 4
    near = torch.randint(0, n_starts, (n_images,), generator=g)
    rows = torch.arange(n_images)
    starts[rows, near] = true_rot @ offsets[k].transpose(1, 2)
    start_shifts[rows, near] = true_shift - t_offsets[s]
    block, _ = oversampled_volume_spectrum(volume, radius + 0.5, 2)

    def score(images, rotations, shifts):
        prior = torch.zeros(shifts.shape[:2], dtype=torch.float64)
        return local_scores(block, 2, points.kx, points.ky, N, images, rotations, shifts, prior)

    rot, shift, evidence = best_of_starts(score, batch, starts, start_shifts, step, shift_step)
    assert evidence.shape == (n_images, n_starts)
    assert torch.equal(evidence.argmax(1), near)
    assert torch.allclose(rot, true_rot, atol=1e-9)
    assert torch.allclose(shift, true_shift, atol=1e-9)
    for i in range(n_images):
        one = ImageBatch(batch.coefficients[i:i + 1], batch.ctf[i:i + 1],
                         batch.weighted_precision[i:i + 1])
        for j in range(n_starts):
            alone = score(one, candidate_rotations(starts[i, j][None], offsets),
                          (start_shifts[i, j] + t_offsets)[None])
            assert math.isclose(float(alone.log_evidence()), float(evidence[i, j]),
                                rel_tol=1e-9, abs_tol=1e-6)


def test_fine_pass_samples_the_cells_that_hold_the_most_mass_at_half_the_step():
    """The fine candidates are the 2 x 2 x 2 and 2 x 2 half-step centres of the coarse cells
    with the most posterior mass: rotations A_j R(c step / 4) for the 8 sign vectors c (so a
    quarter step off A_j on every axis), shifts t_s + (+-step / 4, +-step / 4)."""
    g = torch.Generator().manual_seed(21)
    b, step, shift_step = 3, math.radians(5.0), 0.8
    start = random_rotations(b, generator=g, dtype=torch.float64)
    cands = candidate_rotations(start, rotation_offsets(step, 1))  # (b, 27, 3, 3)
    shifts = torch.randn(b, 1, 2, generator=g, dtype=torch.float64) + shift_offsets(shift_step, 1)
    posterior = torch.rand(b, 27, 9, generator=g, dtype=torch.float64)
    posterior /= posterior.sum((1, 2), keepdim=True)
    fine_rot, fine_shift = oversampled_candidates(posterior, cands, shifts, step, shift_step,
                                                  n_rotation_cells=3, n_shift_cells=2)
    assert fine_rot.shape == (b, 24, 3, 3) and fine_shift.shape == (b, 8, 2)
    top_rot = posterior.sum(2).topk(3, dim=1).indices
    top_shift = posterior.sum(1).topk(2, dim=1).indices
    signs = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0)
                          for z in (-1.0, 1.0)], dtype=torch.float64)
    for i in range(b):
        for cell in range(3):
            coarse = cands[i, top_rot[i, cell]]
            for k in range(8):
                relative = coarse.T @ fine_rot[i, 8 * cell + k]
                # the relative rotation's vector: step / 4 times one of the 8 sign vectors
                vector = torch.stack([relative[2, 1] - relative[1, 2],
                                      relative[0, 2] - relative[2, 0],
                                      relative[1, 0] - relative[0, 1]]) / 2
                angle = math.sqrt(3) * step / 4
                vector *= angle / math.sin(angle)
                assert (vector / (step / 4) - signs).norm(dim=1).min() < 1e-9
        for cell in range(2):
            offsets = fine_shift[i, 4 * cell:4 * cell + 4] - shifts[i, top_shift[i, cell]]
            assert torch.allclose(offsets.abs(), torch.full((4, 2), shift_step / 4,
                                                            dtype=torch.float64))
            assert len({tuple(o.sign().tolist()) for o in offsets}) == 4


def test_back_projection_of_noise_free_images_gives_the_map_back():
    """One-hot posteriors at the true poses of many noise-free images (CTF 1): the gridded
    estimate without a prior equals the truth band-limited to the cutoff, scale included."""
    volume = blob_volume(4)
    radius = 8.0
    g = torch.Generator().manual_seed(5)
    n_images = 1500
    rot = random_rotations(n_images, generator=g, dtype=torch.float64)
    ctf = CtfParameters.from_values(n_images, defocus_u_a=1.0, defocus_v_a=1.0,
                                    defocus_angle_deg=0.0, voltage_kv=300.0,
                                    spherical_aberration_mm=0.0, amplitude_contrast=1.0)
    points, batch = images_at(volume, rot, torch.zeros(n_images, 2, dtype=torch.float64), ctf,
                              radius)
    assert torch.allclose(batch.ctf, torch.ones_like(batch.ctf), atol=1e-3)
    layout = SpectrumLayout(N, math.floor(radius + 1), 2)
    numerator = torch.zeros(backprojection_grid_shape(layout), dtype=torch.complex128)
    weights = torch.zeros(backprojection_grid_shape(layout), dtype=torch.float64)
    block, _ = oversampled_volume_spectrum(volume, radius + 0.5, 2)
    cands = rot.unsqueeze(1)
    for chunk in torch.arange(n_images).split(500):
        part = ImageBatch(batch.coefficients[chunk], batch.ctf[chunk],
                          batch.weighted_precision[chunk])
        scores = local_scores(block, 2, points.kx, points.ky, N, part, cands[chunk],
                              torch.zeros(len(chunk), 1, 2, dtype=torch.float64),
                              torch.zeros(len(chunk), 1, dtype=torch.float64))
        backproject_local(numerator, weights, scores, scores.posterior(), cands[chunk], part,
                          points.kx, points.ky, 2)
    estimate = solve_map(gridded_backprojection(numerator, weights, layout), cutoff_px=radius)
    truth = low_pass(volume, radius, ndim=3)
    fsc = compute_fsc(estimate, truth, pixel_size_a=3.0).fsc
    assert float(fsc[1:int(radius) - 1].min()) > 0.95
    scale = float((estimate * truth).sum() / (truth * truth).sum())
    assert abs(scale - 1) < 0.05


@pytest.mark.parametrize("extent", [1, 2])
def test_posterior_spread_is_the_rms_offset_per_axis(extent):
    """Uniform over the window: the second moment of a uniform integer on -e..e, e(e+1)/3,
    per axis; all mass on the centre: 0; all mass on one shift corner: extent."""
    n_rot, n_shift = (2 * extent + 1) ** 3, (2 * extent + 1) ** 2
    uniform = torch.full((1, n_rot, n_shift), 1.0 / (n_rot * n_shift), dtype=torch.float64)
    expected = math.sqrt(extent * (extent + 1) / 3)
    assert torch.allclose(posterior_spread(uniform, extent),
                          torch.tensor([[expected, expected]], dtype=torch.float64))
    peaked = torch.zeros(1, n_rot, n_shift, dtype=torch.float64)
    peaked[0, 0, 0] = 1.0  # the identity and zero shift come first (cube_grid's order)
    assert torch.allclose(posterior_spread(peaked, extent),
                          torch.zeros(1, 2, dtype=torch.float64))
    corner = torch.zeros(1, n_rot, n_shift, dtype=torch.float64)
    corner[0, 0, -1] = 1.0  # the farthest shift offset: (e, e) or (-e, -e)
    assert torch.allclose(posterior_spread(corner, extent)[0, 1],
                          torch.tensor(float(extent), dtype=torch.float64))


def test_adapted_step_follows_the_posterior_width():
    """Wide posterior (uniform over the window): doubled; narrow: halved; within bounds."""
    from cryostoch.engine.refine import adapted_step

    wide = math.sqrt(2 / 3)  # uniform over an extent-1 window
    assert adapted_step(1.0, wide, 1, 0.1, 4.0) == 2.0
    assert adapted_step(1.0, 0.05, 1, 0.1, 4.0) == 0.5
    assert adapted_step(1.0, 0.3, 1, 0.1, 4.0) == 1.0
    assert adapted_step(3.0, wide, 1, 0.1, 4.0) == 4.0  # at most the coarsest
    assert adapted_step(0.15, 0.0, 1, 0.1, 4.0) == 0.1  # at least the finest


def test_scale_estimate_is_the_posterior_weighted_least_squares_scale():
    """Images made by the simulator with known amplitudes a_i: at the true pose alone the
    estimate is a_i whatever scale the images were scored with; over several candidates it is
    the weighted least-squares scale of the data against the candidates' model images
    (torch.linalg.lstsq on sqrt(r_j w p)-weighted stacks), with the models made by the
    simulator, not by the scores."""
    volume = blob_volume(3)
    g = torch.Generator().manual_seed(12)
    true_rot = random_rotations(3, generator=g, dtype=torch.float64)
    shifts = torch.zeros(3, 2, dtype=torch.float64)
    ctf = random_ctf(3, 8)
    radius = 9.0
    amplitude = torch.tensor([0.4, 1.0, 2.5], dtype=torch.float64)
    points, batch = images_at(volume, true_rot, shifts, ctf, radius)
    images = ImageBatch(batch.coefficients * amplitude[:, None], batch.ctf,
                        batch.weighted_precision * 0.8)
    cands = candidate_rotations(true_rot, rotation_offsets(math.radians(5.0), 1))[:, :4]
    cand_shifts = shifts.unsqueeze(1)
    block, _ = oversampled_volume_spectrum(volume, radius + 0.5, 2)
    for used in (torch.ones(3, dtype=torch.float64), torch.tensor([2.0, 0.5, 1.3]).double()):
        scored = ImageBatch(images.coefficients, images.ctf * used[:, None],
                            images.weighted_precision)
        scores = local_scores(block, 2, points.kx, points.ky, N, scored, cands, cand_shifts,
                              torch.zeros(3, 1, dtype=torch.float64))
        at_truth = torch.zeros(3, 4, 1, dtype=torch.float64)
        at_truth[:, 0] = 1.0
        assert torch.allclose(scale_estimate(scores, at_truth, used), amplitude, rtol=1e-4)
        spread = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
        posterior = spread.view(1, 4, 1).expand(3, 4, 1)
        estimate = scale_estimate(scores, posterior, used)
        for i in range(3):
            _, models = images_at(volume, cands[i], torch.zeros(4, 2, dtype=torch.float64),
                                  ctf.index([i] * 4), radius)
            weight = (spread[:, None] * images.weighted_precision[i][None]).sqrt()
            design = torch.view_as_real(weight * models.coefficients).reshape(-1, 1)
            target = torch.view_as_real(weight * images.coefficients[i][None].expand(4, -1))
            expected = torch.linalg.lstsq(design, target.reshape(-1, 1)).solution.item()
            assert float(estimate[i]) == pytest.approx(expected, rel=1e-4)
