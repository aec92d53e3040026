"""Iterative projection matching: the paper's first baseline (Fig. 6, left).

One iteration: project the current density at every orientation of the quadrature, give each
image the single orientation and shift whose CTF-modulated projection has the highest
normalised cross-correlation with it (`best_poses(score="correlation")`, a
global search), then reconstruct the density from the images at those poses by CTF-weighted
back-projection with a Wiener regulariser (`hard_statistics` and `closed_form_map`). Repeat.

Every iteration reads every training image once; the engine counts it as K gradient-
evaluation equivalents (K = number of images) so that its curves share an axis with the
stochastic runs. No likelihood is evaluated, so `mean_nll` is None.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from cryostoch.baselines.iteration import (
    ChunkAssignment,
    IterationResult,
    accumulate_and_solve,
    iterate,
)
from cryostoch.baselines.reconstruct_map import Regulariser
from cryostoch.model.hard_assignment import best_poses, hard_statistics
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters

__all__ = ["projection_matching", "projection_matching_iteration"]


def _best_correlation(model: MarginalLikelihood, slices: Tensor, chunk: Tensor,
                      chunk_ctf: CtfParameters, precision: Tensor | None) -> ChunkAssignment:
    """Projection matching scores by plain cross-correlation: `precision` is not used."""
    best, best_score = best_poses(model, slices, chunk, chunk_ctf, score="correlation")
    numerator, denominator = hard_statistics(model, chunk, chunk_ctf, best)
    return ChunkAssignment(numerator, denominator, best, best_score)


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
    sum_over_shares: Callable[[Tensor], Tensor] | None = None,
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> IterationResult:
    """Assign each image its best pose by cross-correlation, then reconstruct (closed form).

    blocks: (K, 2h+1, h+1) image blocks in the model's layout (any device); ctf: their CTFs.
    `refine_iterations`: CG steps of the exact M-step solve (`closed_form_map`).
    `progress(n)` is called after each chunk of n images. `sum_over_shares`: for `blocks`
    that are one share of the images (data parallel), see `accumulate_and_solve`.
    symmetrize: the run's `Symmetrizer` for a point group (the sums are pooled over it,
    `closed_form_map`), or None.
    """
    return accumulate_and_solve(partial(_best_correlation, model), model, volume, blocks, ctf,
                                regulariser=regulariser, chunk_size=chunk_size,
                                refine_iterations=refine_iterations, progress=progress,
                                sum_over_shares=sum_over_shares, symmetrize=symmetrize)


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
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """`iterations` rounds of projection matching from `volume`; returns the final map.

    `callback(iteration, result)` (iteration counted from 1) runs after every round.
    """
    return iterate(projection_matching_iteration, model, volume, blocks, ctf,
                   iterations=iterations, callback=callback, regulariser=regulariser,
                   chunk_size=chunk_size, refine_iterations=refine_iterations,
                   symmetrize=symmetrize)
