"""What the two baselines share: one pass over the images that accumulates back-projection
sums chunk by chunk, then a closed-form map; and the loop of such passes.

A baseline differs only in how a chunk of images is assigned to poses (its E-step): projection
matching takes the single best pose by cross-correlation, batch EM weights every pose by its
posterior. That step is a function `assign(slices, chunk, chunk_ctf, chunk_precision) ->
ChunkAssignment` (chunk_precision: the chunk's noise precision, or None for white noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.baselines.reconstruct_map import Regulariser, closed_form_map
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters

__all__ = ["ChunkAssignment", "IterationResult", "accumulate_and_solve", "image_chunks",
           "iterate"]


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


@dataclass
class ChunkAssignment:
    """A chunk's E-step: back-projection sums (numerator, denominator) per direction, each
    image's best pose and its score, and the chunk's summed NLL (None if not evaluated)."""

    numerator: Tensor
    denominator: Tensor
    best_pose_index: Tensor
    score: Tensor
    nll_sum: float | None = None


def image_chunks(
    model: MarginalLikelihood, blocks: Tensor, ctf: CtfParameters, chunk_size: int,
    noise_precision: Tensor | None = None,
) -> Iterator[tuple[int, int, Tensor, CtfParameters, Tensor | None]]:
    """(start, stop, blocks on the model's device, CTF, noise precision (b, M) or None) for
    consecutive chunks of images; noise_precision: (K, M) per image, or None (white)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    n = blocks.shape[0]
    if len(ctf) != n:
        raise ValueError(f"{n} image blocks but {len(ctf)} CTF parameter sets")
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        precision = None if noise_precision is None else noise_precision[start:stop]
        yield (start, stop, blocks[start:stop].to(model.device), ctf.index(slice(start, stop)),
               precision)


def accumulate_and_solve(
    assign: Callable[[Tensor, Tensor, CtfParameters, Tensor | None], ChunkAssignment],
    model: MarginalLikelihood,
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    *,
    regulariser: Regulariser | None,
    chunk_size: int,
    refine_iterations: int,
    progress: Callable[[int], None] | None,
    noise_precision: Tensor | None = None,
    sum_over_shares: Callable[[Tensor], Tensor] | None = None,
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> IterationResult:
    """One iteration: `assign` every chunk under `volume`, sum, and solve for the new map.

    noise_precision: (K, M) per-image noise precision (coloured noise) or None (white).
    Data parallel: `blocks` may be one share of the images, the others assigned elsewhere;
    `sum_over_shares` (in place, e.g. an all-reduce) then sums the shares' back-projection
    sums, NLLs and image counts before the map is solved, so every share gets the same map;
    `pose_index` and `score` cover this share's images only. symmetrize: the run's
    `Symmetrizer` for a point group (the M-step pools the sums over it and returns a symmetric
    map, `closed_form_map`), or None (C1)."""
    n = blocks.shape[0]
    if n == 0:
        raise ValueError("a baseline iteration needs at least one image")
    with torch.no_grad():
        volume = volume.detach().to(device=model.device, dtype=model.dtype)
        slices = model.slices(volume)
        numerator = torch.zeros(model.n_directions, model.n_points, dtype=torch.complex128,
                                device=model.device)
        denominator = torch.zeros(model.n_directions, model.n_points, dtype=torch.float64,
                                  device=model.device)
        pose = torch.empty(n, dtype=torch.long)
        score = torch.empty(n, dtype=torch.float64)
        nll_sum: float | None = None
        for start, stop, chunk, chunk_ctf, chunk_precision in image_chunks(
                model, blocks, ctf, chunk_size, noise_precision):
            part = assign(slices, chunk, chunk_ctf, chunk_precision)
            numerator += part.numerator
            denominator += part.denominator
            pose[start:stop] = part.best_pose_index.cpu()
            score[start:stop] = part.score.double().cpu()
            if part.nll_sum is not None:
                nll_sum = (nll_sum or 0.0) + part.nll_sum
            if progress is not None:
                progress(stop - start)
        count = float(n)
        if sum_over_shares is not None:
            sum_over_shares(numerator)
            sum_over_shares(denominator)
            totals = sum_over_shares(torch.tensor([nll_sum or 0.0, count], dtype=torch.float64))
            nll_sum = None if nll_sum is None else float(totals[0])
            count = float(totals[1])
        new = closed_form_map(numerator, denominator, model, regulariser=regulariser,
                              current=volume, refine_iterations=refine_iterations,
                              symmetrize=symmetrize)
    return IterationResult(new, pose, score, None if nll_sum is None else nll_sum / count)


def iterate(
    step: Callable[..., IterationResult],
    model: MarginalLikelihood,
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    *,
    iterations: int,
    callback: Callable[[int, IterationResult], None] | None = None,
    **options,
) -> Tensor:
    """`iterations` rounds of `step` from `volume`; returns the final map.

    `callback(iteration, result)` (iteration counted from 1) runs after every round.
    """
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    current = volume.detach().to(device=model.device, dtype=model.dtype)
    for it in range(1, iterations + 1):
        result = step(model, current, blocks, ctf, **options)
        current = result.volume
        if callback is not None:
            callback(it, result)
    return current
