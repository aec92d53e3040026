"""Local pose search: each image scored only near its own current pose (refinement, pruning).

The exhaustive likelihood (`likelihood.py`) sums every image over one shared grid of
directions, in-plane angles and shifts, which costs the fifth power of the cutoff. Once an
image's pose is roughly known, its posterior lives in a small neighbourhood, so refinement
(and the coarse-to-fine pruned search) scores each image i only on its own candidates

    A_ij = A_i R_j    (j = 1..J, R_j small rotations about the identity, `rotation_offsets`)
    t_is = t_i + d_s  (s = 1..S, small shift offsets, `shift_offsets`)

with the same Gaussian energy as the exhaustive model (DESIGN.md, paper eq. 4):

    logit_ijs = Re sum_k w_k p_ik C_ik conj(X_ik u_isk) S_ijk - 1/2 sum_k w_k p_ik C_ik^2 |S_ijk|^2
                + log prior(t_is)

where S_ij = sqrt(N) V_hat(A_ij^T k) (trilinear reads of the oversampled spectrum block,
`extract_slices_sampled`), X_i the image coefficients, C_i the CTF, p_i the noise precision,
u_isk = exp(+2 pi i k.t_is / N) the un-shift phase and w_k the half-plane twin weights. Rotations
are full 3x3 matrices (RELION convention), so no in-plane image interpolation is needed and the
candidates of different images need not share a grid. The posterior-weighted sums of the
M-step are back-projected with the exact adjoint of the same reads (`insert_slices`), for the
candidates that carry posterior mass only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.geometry.rotations import rotvec_to_matrix
from cryostoch.operators.slicing import (
    extract_slices_sampled,
    insert_slices_and_weights,
)

# On the CPU a chunk's largest temporary (the (b, J, M) complex slices) is kept under this:
# glibc hands out blocks above its mmap threshold (32 MiB at most) as fresh pages returned on
# free, so each chunk's temporaries were page-faulted anew; on beta-galactosidase with 128
# images a chunk the kernel's time exceeded the computation's (sys 237 s, user 194 s)
CPU_CHUNK_BYTES = 8 * 2**20


def chunk_rows(device: torch.device, dtype: torch.dtype, rotations_per_image: int,
               n_points: int, limit: int) -> int:
    """Images per chunk of local scores with `rotations_per_image` candidates at `n_points`
    points each: `limit`, and on the CPU at most what keeps the (b, J, M) complex slices of
    `dtype` within CPU_CHUNK_BYTES (accelerators keep their large chunks)."""
    if device.type != "cpu":
        return limit
    per_image = rotations_per_image * n_points * 2 * dtype.itemsize
    return max(1, min(limit, CPU_CHUNK_BYTES // per_image))


def cube_grid(extent: int, dims: int, *, device=None) -> Tensor:
    """(K, dims) integer points of {-e..e}^dims ordered by distance from the origin (origin
    first; ties in a fixed order): the layout of `rotation_offsets` and `shift_offsets`."""
    if extent < 0:
        raise ValueError("extent must be >= 0")
    axis = torch.arange(-extent, extent + 1, dtype=torch.float64, device=device)
    grid = torch.stack(torch.meshgrid(*([axis] * dims), indexing="ij"), -1).reshape(-1, dims)
    return grid[grid.norm(dim=1).argsort(stable=True)]


def on_edge(extent: int, dims: int, *, device=None) -> Tensor:
    """(K,) bool: which points of `cube_grid` lie on the cube's surface (|index| = extent)."""
    return cube_grid(extent, dims, device=device).abs().amax(1) == extent


def rotation_offsets(step_rad: float, extent: int = 1, *, dtype=torch.float64,
                     device=None) -> Tensor:
    """(J, 3, 3) small rotations: rotation vectors step * {-e..e}^3 (`cube_grid`), identity
    first."""
    if not step_rad > 0:
        raise ValueError("step must be positive")
    return rotvec_to_matrix(cube_grid(extent, 3, device=device) * step_rad).to(dtype)


def shift_offsets(step_px: float, extent: int = 1, *, dtype=torch.float64,
                  device=None) -> Tensor:
    """(S, 2) shift offsets step * {-e..e}^2 in pixels (`cube_grid`), zero first."""
    if not step_px > 0:
        raise ValueError("step must be positive")
    return (cube_grid(extent, 2, device=device) * step_px).to(dtype)


@dataclass(frozen=True)
class ImageBatch:
    """What the local scores need of b images at the M half-plane points (kx, ky).

    coefficients: (b, M) complex image spectra (unitary, noise-normalised);
    ctf: (b, M) real CTF; weighted_precision: (b, M) w_k p_ik (twin weight times noise precision).
    """

    coefficients: Tensor
    ctf: Tensor
    weighted_precision: Tensor

    def data_norm(self) -> Tensor:
        """(b,) 1/2 sum_k w_k p_ik |X_ik|^2, the pose-independent part of the energy."""
        power = self.coefficients.real**2 + self.coefficients.imag**2
        return 0.5 * (power * self.weighted_precision).sum(-1)


@dataclass
class LocalScores:
    """Scores of b images over their own J rotations x S shifts."""

    logits: Tensor  # (b, J, S) log unnormalised posterior (without the data norm)
    unshifted: Tensor  # (b, S, M) complex w p C X u: the data side at every shift
    cross: Tensor  # (b, J, S) sum_k w p C Re(conj(P_j) X u_s): the data term of the logits
    quadratic: Tensor  # (b, J) 1/2 sum_k w p C^2 |P_j|^2: the model term

    def posterior(self) -> Tensor:
        """(b, J, S) posterior over each image's candidates."""
        flat = self.logits.flatten(1)
        return torch.softmax(flat, dim=1).view_as(self.logits)

    def log_evidence(self) -> Tensor:
        """(b,) log sum_js exp(logit) (the candidates' share of the marginal likelihood)."""
        return torch.logsumexp(self.logits.flatten(1), dim=1)


def candidate_rotations(rotations: Tensor, offsets: Tensor) -> Tensor:
    """(b, 3, 3) current rotations and (J, 3, 3) offsets -> (b, J, 3, 3) A_i R_j."""
    return rotations.unsqueeze(1) @ offsets.to(rotations.dtype).unsqueeze(0)


def local_scores(block: Tensor, oversampling: int, kx: Tensor, ky: Tensor, box_size: int,
                 images: ImageBatch, rotations: Tensor, shifts_px: Tensor,
                 log_shift_prior: Tensor) -> LocalScores:
    """Scores of each image over its own candidates.

    block: (Kz, Ky, Kx) complex oversampled half spectrum of the map (`PrunedDft.volume` or
    `oversampled_volume_spectrum`); kx, ky: (M,) the images' half-plane points;
    rotations: (b, J, 3, 3) candidate rotations; shifts_px: (b, S, 2) candidate shifts (the
    particle centre at +t); log_shift_prior: (b, S).
    """
    real_dtype = images.ctf.dtype
    slices = extract_slices_sampled(block, rotations, kx, ky, oversampling) * math.sqrt(box_size)
    slices = slices.to(images.coefficients.dtype)  # (b, J, M)
    # exp(+2 pi i k.t / N) for every image's own shifts: (b, S, M)
    phase = (shifts_px[..., 0:1] * kx.to(shifts_px.dtype)
             + shifts_px[..., 1:2] * ky.to(shifts_px.dtype)) * (2 * math.pi / box_size)
    unshift = torch.polar(torch.ones_like(phase), phase).to(images.coefficients.dtype)
    data = (images.weighted_precision * images.ctf).to(real_dtype) * images.coefficients
    unshifted = data.unsqueeze(1) * unshift  # (b, S, M)
    cross = (slices.real @ unshifted.real.transpose(1, 2)
             + slices.imag @ unshifted.imag.transpose(1, 2))  # (b, J, S)
    power = slices.real**2 + slices.imag**2
    quadratic = 0.5 * (power * (images.weighted_precision * images.ctf**2).unsqueeze(1)).sum(-1)
    logits = cross - quadratic.unsqueeze(-1) + log_shift_prior.unsqueeze(1).to(real_dtype)
    return LocalScores(logits, unshifted, cross, quadratic)


def scale_estimate(scores: LocalScores, posterior: Tensor, scale: Tensor) -> Tensor:
    """(b,) each image's amplitude scale a maximising the expected log-likelihood under
    `posterior` (b, J, S), for images scored with their CTFs multiplied by `scale` (b,):
    with the model a C P, the energy -a c + a^2 q / 2 is least at a = E[c] / E[q], where c
    and q are the data and model terms at a = 1 (RELION's scale correction, per particle)."""
    scale = scale.to(scores.cross.dtype)
    data = (posterior * scores.cross).sum((1, 2)) / scale
    model = 2 * (posterior.sum(-1) * scores.quadratic).sum(1) / scale**2
    return data / model.clamp_min(torch.finfo(model.dtype).tiny)


def posterior_spread(posterior: Tensor, extent: int) -> Tensor:
    """(b, 2) each image's posterior rms offset from the window's centre per axis, in steps:
    over the rotation axes (first) and the shift axes (second).

    posterior: (b, J, S) over the `cube_grid(extent, 3)` rotation offsets and the
    `cube_grid(extent, 2)` shift offsets. A posterior filling the window evenly gives
    sqrt(extent (extent + 1) / 3); one on the centre gives 0.
    """
    grid3 = cube_grid(extent, 3, device=posterior.device).to(posterior.dtype)
    grid2 = cube_grid(extent, 2, device=posterior.device).to(posterior.dtype)
    rotation = posterior.sum(2) @ (grid3.square().sum(1) / 3)
    shift = posterior.sum(1) @ (grid2.square().sum(1) / 2)
    return torch.stack([rotation, shift], 1).sqrt()


def oversampled_candidates(posterior: Tensor, rotations: Tensor, shifts_px: Tensor,
                           rotation_step_rad: float, shift_step_px: float,
                           n_rotation_cells: int = 8, n_shift_cells: int = 4
                           ) -> tuple[Tensor, Tensor]:
    """The fine pass of a local search (RELION's adaptive oversampling): each of the
    `n_rotation_cells` rotation candidates and `n_shift_cells` shift candidates that hold the
    most posterior mass is split into the 2 x 2 x 2 (rotation) and 2 x 2 (shift) centres of
    its cell at half the step, so the significant region is sampled twice as finely.

    posterior: (b, J, S) over rotations (b, J, 3, 3) x shifts_px (b, S, 2) on a grid of
    steps `rotation_step_rad`, `shift_step_px`. Returns (b, 8 Kr, 3, 3) rotations and
    (b, 4 Ks, 2) shifts: A_j R(d) for d in (+-step / 4)^3, t_s + (+-step / 4)^2, cell by cell.
    Every fine point holds the same share of its cell, so they need no weights of their own.
    """
    b = posterior.shape[0]
    top_rot = posterior.sum(2).topk(min(n_rotation_cells, posterior.shape[1]), dim=1).indices
    top_shift = posterior.sum(1).topk(min(n_shift_cells, posterior.shape[2]), dim=1).indices
    corners3 = cube_grid(1, 3, device=posterior.device)
    corners3 = corners3[corners3.abs().amin(1) == 1]  # the 8 corners (+-1, +-1, +-1)
    corners2 = cube_grid(1, 2, device=posterior.device)
    corners2 = corners2[corners2.abs().amin(1) == 1]  # the 4 corners (+-1, +-1)
    sub_rot = rotvec_to_matrix(corners3 * (rotation_step_rad / 4)).to(rotations.dtype)
    chosen = rotations.gather(1, top_rot[..., None, None].expand(-1, -1, 3, 3))
    fine_rot = (chosen.unsqueeze(2) @ sub_rot).reshape(b, -1, 3, 3)
    chosen_shift = shifts_px.gather(1, top_shift[..., None].expand(-1, -1, 2))
    fine_shift = chosen_shift.unsqueeze(2) + (corners2 * (shift_step_px / 4)).to(
        shifts_px.dtype)
    return fine_rot, fine_shift.reshape(b, -1, 2)


def best_of_starts(score: Callable[[ImageBatch, Tensor, Tensor], LocalScores],
                   images: ImageBatch, rotations: Tensor, shifts_px: Tensor,
                   rotation_step_rad: float, shift_step_px: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The fine stage of a coarse-to-fine search: each of b images has K starts (the most
    probable poses of a coarse exhaustive search), each scored over a +-1-step local window
    (27 rotations x 9 shifts) by `score(images, (b', J, 3, 3), (b', S, 2))`; the start whose
    window holds the most evidence wins (a mode, not a lone spike of noise), and within it
    the most probable candidate.

    images: b images; rotations: (b, K, 3, 3); shifts_px: (b, K, 2). Returns the chosen
    (b, 3, 3) rotations, (b, 2) shifts and (b, K) each start's log evidence.
    """
    b, k = rotations.shape[:2]
    device = rotations.device
    repeat = torch.arange(b, device=device).repeat_interleave(k)
    expanded = ImageBatch(images.coefficients[repeat], images.ctf[repeat],
                          images.weighted_precision[repeat])
    offsets = rotation_offsets(rotation_step_rad, 1, dtype=rotations.dtype, device=device)
    candidates = candidate_rotations(rotations.reshape(b * k, 3, 3), offsets)
    candidate_shifts = shifts_px.reshape(b * k, 1, 2) + shift_offsets(
        shift_step_px, 1, dtype=shifts_px.dtype, device=device)
    scores = score(expanded, candidates, candidate_shifts)
    evidence = scores.log_evidence().view(b, k)
    chosen = evidence.argmax(1) + torch.arange(b, device=device) * k
    best = scores.logits[chosen].flatten(1).argmax(1)
    n_shifts = candidate_shifts.shape[1]
    return (candidates[chosen, best // n_shifts], candidate_shifts[chosen, best % n_shifts],
            evidence)


def backproject_local(numerator: Tensor, weights: Tensor, scores: LocalScores,
                      posterior: Tensor, rotations: Tensor, images: ImageBatch, kx: Tensor,
                      ky: Tensor, oversampling: int, min_relative_mass: float = 1e-3,
                      max_rotations: int = 16) -> None:
    """Add the posterior-weighted M-step sums of b images into 3-D half-spectrum accumulators.

    numerator: (Kz, Ky, Kx) complex, += B[sum_s r_ijs w p C X u_is] and weights: (Kz, Ky, Kx)
    real, += B[r_ij w p C^2], with B the trilinear back-projection along A_ij (`insert_slices`,
    the adjoint of the reads that scored them). Only rotations holding at least
    `min_relative_mass` of the image's most probable one, and at most its `max_rotations` most
    probable, are inserted (the rest carry little and cost as much each); each image's kept
    mass is renormalised to one.
    posterior: (b, J, S); rotations: (b, J, 3, 3); kx, ky: (M,) float64.
    """
    mass = posterior.sum(-1)  # (b, J)
    keep = mass >= min_relative_mass * mass.amax(1, keepdim=True)
    if mass.shape[1] > max_rotations:
        threshold = mass.topk(max_rotations, dim=1).values[:, -1:]
        keep &= mass >= threshold
    image, rotation = keep.nonzero(as_tuple=True)
    kept_total = (mass * keep).sum(1)  # (b,)
    r = posterior[image, rotation] / kept_total[image].unsqueeze(-1)  # (n, S)
    data = scores.unshifted[image]  # (n, S, M)
    num = torch.complex(torch.einsum("ns,nsm->nm", r, data.real),
                        torch.einsum("ns,nsm->nm", r, data.imag))
    ctf2 = (images.weighted_precision * images.ctf**2)[image]  # (n, M)
    den = r.sum(-1, keepdim=True) * ctf2
    # the stencil in single precision (grid positions to ~1e-5 px): the insert's main cost
    chosen = rotations[image, rotation].to(torch.float32)
    insert_slices_and_weights(numerator, weights, num, den, chosen, kx.to(torch.float32),
                              ky.to(torch.float32), oversampling)
