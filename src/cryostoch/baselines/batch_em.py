"""Batch expectation-maximisation in the style of RELION: the paper's second baseline (Fig. 6).

One iteration uses every training image. E-step: under the current map, each image's
posterior over the whole quadrature (directions x in-plane angles x shifts) is computed with
the same marginal likelihood the stochastic methods optimise
(`MarginalLikelihood.evaluate(..., statistics=True)`), which also returns the posterior-
weighted back-projection sums sum r w C X and sum r w C^2 per direction. M-step: the map is
updated in closed form from those sums with a Wiener (Gaussian power-spectrum) prior
(`closed_form_map`), as RELION's `relion_refine` does with its tau^2 from the reference power.

Every iteration reads every training image once, so the engine counts it as K gradient-
evaluation equivalents (K = number of training images; one E-step costs about as much as K
single-image gradient evaluations: the same GEMMs, without the slice insertion of a
gradient). `mean_nll` is the mean negative log marginal likelihood of the images under the
map *before* the update (the E-step's map), which EM never increases when the M-step is exact.
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
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters

__all__ = ["batch_em", "em_iteration"]


def _posterior_weights(model: MarginalLikelihood, slices: Tensor, chunk: Tensor,
                       chunk_ctf: CtfParameters, precision: Tensor | None) -> ChunkAssignment:
    result = model.evaluate(slices, chunk, chunk_ctf, statistics=True,
                            noise_precision=precision)
    numerator, denominator = result.statistics
    return ChunkAssignment(numerator, denominator, result.best_pose_index,
                           result.best_pose_probability, float(result.nll.double().sum()))


def em_iteration(
    model: MarginalLikelihood,
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    *,
    regulariser: Regulariser | None = None,
    chunk_size: int = 500,
    refine_iterations: int = 10,
    progress: Callable[[int], None] | None = None,
    noise_precision: Tensor | None = None,
    sum_over_shares: Callable[[Tensor], Tensor] | None = None,
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> IterationResult:
    """One E-step over every image and a closed-form M-step.

    blocks: (K, 2h+1, h+1) image blocks in the model's layout (any device); ctf: their CTFs.
    `refine_iterations`: CG steps of the exact M-step solve (`closed_form_map`).
    `progress(n)` is called after each chunk of n images. noise_precision: (K, M) per-image
    precision 1 / sigma_k^2 (coloured noise): the E-step's posteriors and the M-step's sums
    are then noise-weighted, as RELION's are. `sum_over_shares`: for `blocks` that are one
    share of the images (data parallel), see `accumulate_and_solve`. symmetrize: the run's
    `Symmetrizer` for a point group (the sums are pooled over it, `closed_form_map`), or None.
    """
    return accumulate_and_solve(partial(_posterior_weights, model), model, volume, blocks, ctf,
                                regulariser=regulariser, chunk_size=chunk_size,
                                refine_iterations=refine_iterations, progress=progress,
                                noise_precision=noise_precision, sum_over_shares=sum_over_shares,
                                symmetrize=symmetrize)


def batch_em(
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
    """`iterations` EM iterations from `volume`; returns the final map.

    `callback(iteration, result)` (iteration counted from 1) runs after every iteration.
    """
    return iterate(em_iteration, model, volume, blocks, ctf, iterations=iterations,
                   callback=callback, regulariser=regulariser, chunk_size=chunk_size,
                   refine_iterations=refine_iterations, symmetrize=symmetrize)
