"""Hard pose assignments for the baselines: best pose per image and one-hot back-projection.

Iterative projection matching picks each image's single best quadrature point by normalised
cross-correlation and back-projects the image there; these are the same GEMMs as the marginal
likelihood's (`cryostoch.model.likelihood`) with a max instead of a log-sum-exp.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters


def best_poses(
    model: MarginalLikelihood, slices: Tensor, blocks: Tensor, ctf: CtfParameters, *,
    score: str = "correlation",
) -> tuple[Tensor, Tensor]:
    """The single best quadrature point of every image and its score, each (B,).

    slices: (D, M); blocks: (B, 2h+1, h+1); ctf: (B,).
    score="correlation": normalised cross-correlation Re<X, C S> / ||C S|| (the image norm
    is the same for every pose), as iterative projection matching uses; "likelihood":
    the maximum of log w - E (the MAP pose). Returns (flat pose index, score).
    """
    if score not in ("correlation", "likelihood"):
        raise ValueError("score must be 'correlation' or 'likelihood'")
    if score == "likelihood":
        result = model.evaluate(slices, blocks, ctf)
        return result.best_pose_index, torch.log(result.best_pose_probability)
    s = slices.detach().to(model.complex_dtype)
    blocks = model.crop_blocks(blocks)
    n_images = blocks.shape[0]
    p_count, t_count, m = model.n_inplane, model.n_shifts, model.n_points
    s_stacked = torch.cat([s.real, s.imag], dim=1)
    s_power = s.real**2 + s.imag**2
    ctf_values = model.images.ctf_values(ctf)
    image_chunk, dir_chunk = model.kernel.chunk_sizes(n_images)
    best_index = torch.empty(n_images, dtype=torch.long, device=model.device)
    best_score = torch.empty(n_images, dtype=model.dtype, device=model.device)
    for start in range(0, n_images, image_chunk):
        stop = min(n_images, start + image_chunk)
        b = stop - start
        terms = model.images.terms(blocks[start:stop], ctf_values[start:stop])
        y = (terms.rotated.unsqueeze(2) * model.images.unshift.unsqueeze(0)) \
            * terms.weighted_ctf.unsqueeze(2)
        y_stacked = torch.cat([y.real, y.imag], dim=-1).reshape(b * p_count * t_count, 2 * m)
        top = torch.full((b,), -math.inf, dtype=model.dtype, device=model.device)
        arg = torch.zeros(b, dtype=torch.long, device=model.device)
        for d0 in range(0, model.n_directions, dir_chunk):
            d1 = min(model.n_directions, d0 + dir_chunk)
            cross = (y_stacked @ s_stacked[d0:d1].T).view(b, p_count, t_count, -1)
            norm = (terms.weighted_ctf2.reshape(b * p_count, m) @ s_power[d0:d1].T).clamp(
                min=1e-30).sqrt()
            cc = (cross / norm.view(b, p_count, 1, -1)).reshape(b, -1)
            chunk_top, chunk_arg = cc.max(dim=1)
            better = chunk_top > top
            arg = torch.where(better, model.grid.from_chunk_argmax(chunk_arg, d0, d1 - d0), arg)
            top = torch.maximum(top, chunk_top)
        best_index[start:stop] = arg
        best_score[start:stop] = top
    return best_index, best_score


def hard_statistics(
    model: MarginalLikelihood, blocks: Tensor, ctf: CtfParameters, pose_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Back-projection sums with every image at one pose: (sum w C X, sum w C^2), (D, M).

    blocks: (B, 2h+1, h+1); ctf: (B,); pose_index: (B,) flat pose indices. The same
    quantities as `model.evaluate(..., statistics=True)` with one-hot responsibilities.
    """
    blocks = model.crop_blocks(blocks)
    n_images = blocks.shape[0]
    m = model.n_points
    ctf_values = model.images.ctf_values(ctf)
    d, p, t = model.grid.decode(pose_index.to(model.device))
    numerator = torch.zeros(model.n_directions, m, dtype=model.complex_dtype,
                            device=model.device)
    denominator = torch.zeros(model.n_directions, m, dtype=model.dtype, device=model.device)
    image_chunk = max(1, model.kernel.chunk_sizes(n_images)[0])
    for start in range(0, n_images, image_chunk):
        stop = min(n_images, start + image_chunk)
        terms = model.images.terms(blocks[start:stop], ctf_values[start:stop])
        rows = torch.arange(stop - start, device=model.device)
        p_i, t_i, d_i = p[start:stop], t[start:stop], d[start:stop]
        x_best = terms.rotated[rows, p_i] * model.images.unshift[p_i, t_i]  # (b, M)
        numerator.index_add_(0, d_i, x_best * terms.weighted_ctf[rows, p_i])
        denominator.index_add_(0, d_i, terms.weighted_ctf2[rows, p_i])
    return numerator, denominator
