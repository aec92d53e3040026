"""Iterative projection matching: the paper's first baseline (Fig. 6, left).

One iteration: project the current density at every orientation of the quadrature, give each
image the single orientation and shift whose CTF-modulated projection has the highest
normalised cross-correlation with it (`MarginalLikelihood.best_poses(score="correlation")`, a
global search), then reconstruct the density from the images at those poses by CTF-weighted
back-projection with a Wiener regulariser (`hard_statistics` and `closed_form_map`). Repeat.

Every iteration reads every training image once; the engine counts it as K gradient-
evaluation equivalents (K = number of images) so that its curves share an axis with the
stochastic runs. No likelihood is evaluated, so `mean_nll` is None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.baselines.reconstruct_map import Regulariser, closed_form_map
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters

__all__ = ["IterationResult", "image_chunks", "projection_matching",
           "projection_matching_iteration"]


@dataclass
class IterationResult:
    """The outcome of one baseline iteration over every image.

    volume: the updated map (N, N, N) on the model's device and dtype.
    pose_index: (K,) flat quadrature index of each image's best pose under the *previous*
    map (the assignment the update used), on the CPU.
    score: (K,) its normalised cross-correlation (projection matching) or posterior
    probability (EM), float64 on the CPU.
    mean_nll: mean negative log marginal likelihood of the images under the previous map
    (EM only; None for projection matching).
    """

    volume: Tensor
    pose_index: Tensor
    score: Tensor
    mean_nll: float | None = None


def image_chunks(
    model: MarginalLikelihood, blocks: Tensor, ctf: CtfParameters, chunk_size: int
) -> Iterator[tuple[int, int, Tensor, CtfParameters]]:
    """(start, stop, blocks on the model's device, CTF) for consecutive chunks of images."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    n = blocks.shape[0]
    if len(ctf) != n:
        raise ValueError(f"{n} image blocks but {len(ctf)} CTF parameter sets")
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        yield start, stop, blocks[start:stop].to(model.device), ctf.index(slice(start, stop))


def projection_matching_iteration(
    model: MarginalLikelihood,
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    *,
    regulariser: Regulariser | None = None,
    chunk_size: int = 500,
    refine_iterations: int = 10,
    progress: Callable[[int], None] | None = None,
) -> IterationResult:
    """Assign each image its best pose by cross-correlation, then reconstruct (closed form).

    blocks: (K, 2h+1, h+1) image blocks in the model's layout (any device); ctf: their CTFs.
    `refine_iterations`: CG steps of the exact M-step solve (`closed_form_map`).
    `progress(n)` is called after each chunk of n images.
    """
    n = blocks.shape[0]
    if n == 0:
        raise ValueError("projection matching needs at least one image")
    with torch.no_grad():
        volume = volume.detach().to(device=model.device, dtype=model.dtype)
        slices = model.slices(volume)
        numerator = torch.zeros(model.n_directions, model.n_points, dtype=torch.complex128,
                                device=model.device)
        denominator = torch.zeros(model.n_directions, model.n_points, dtype=torch.float64,
                                  device=model.device)
        pose = torch.empty(n, dtype=torch.long)
        score = torch.empty(n, dtype=torch.float64)
        for start, stop, chunk, chunk_ctf in image_chunks(model, blocks, ctf, chunk_size):
            best, best_score = model.best_poses(slices, chunk, chunk_ctf, score="correlation")
            num, den = model.hard_statistics(chunk, chunk_ctf, best)
            numerator += num
            denominator += den
            pose[start:stop] = best.cpu()
            score[start:stop] = best_score.double().cpu()
            if progress is not None:
                progress(stop - start)
        new = closed_form_map(numerator, denominator, model, regulariser=regulariser,
                              current=volume, refine_iterations=refine_iterations)
    return IterationResult(new, pose, score, None)


def projection_matching(
    model: MarginalLikelihood,
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    *,
    iterations: int,
    regulariser: Regulariser | None = None,
    chunk_size: int = 500,
    refine_iterations: int = 10,
    callback: Callable[[int, IterationResult], None] | None = None,
) -> Tensor:
    """`iterations` rounds of projection matching from `volume`; returns the final map.

    `callback(iteration, result)` (iteration counted from 1) runs after every round.
    """
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    current = volume.detach().to(device=model.device, dtype=model.dtype)
    for it in range(1, iterations + 1):
        result = projection_matching_iteration(model, current, blocks, ctf,
                                               regulariser=regulariser, chunk_size=chunk_size,
                              refine_iterations=refine_iterations)
        current = result.volume
        if callback is not None:
            callback(it, result)
    return current
