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

import torch
from torch import Tensor

from cryostoch.baselines.projection_matching import IterationResult, image_chunks
from cryostoch.baselines.reconstruct_map import Regulariser, closed_form_map
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters

__all__ = ["batch_em", "em_iteration"]


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
) -> IterationResult:
    """One E-step over every image and a closed-form M-step.

    blocks: (K, 2h+1, h+1) image blocks in the model's layout (any device); ctf: their CTFs.
    `refine_iterations`: CG steps of the exact M-step solve (`closed_form_map`).
    `progress(n)` is called after each chunk of n images.
    """
    n = blocks.shape[0]
    if n == 0:
        raise ValueError("EM needs at least one image")
    with torch.no_grad():
        volume = volume.detach().to(device=model.device, dtype=model.dtype)
        slices = model.slices(volume)
        numerator = torch.zeros(model.n_directions, model.n_points, dtype=torch.complex128,
                                device=model.device)
        denominator = torch.zeros(model.n_directions, model.n_points, dtype=torch.float64,
                                  device=model.device)
        pose = torch.empty(n, dtype=torch.long)
        probability = torch.empty(n, dtype=torch.float64)
        nll_sum = 0.0
        for start, stop, chunk, chunk_ctf in image_chunks(model, blocks, ctf, chunk_size):
            result = model.evaluate(slices, chunk, chunk_ctf, statistics=True)
            num, den = result.statistics
            numerator += num
            denominator += den
            nll_sum += float(result.nll.double().sum())
            pose[start:stop] = result.best_pose_index.cpu()
            probability[start:stop] = result.best_pose_probability.double().cpu()
            if progress is not None:
                progress(stop - start)
        new = closed_form_map(numerator, denominator, model, regulariser=regulariser,
                              current=volume, refine_iterations=refine_iterations)
    return IterationResult(new, pose, probability, nll_sum / n)


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
) -> Tensor:
    """`iterations` EM iterations from `volume`; returns the final map.

    `callback(iteration, result)` (iteration counted from 1) runs after every iteration.
    """
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    current = volume.detach().to(device=model.device, dtype=model.dtype)
    for it in range(1, iterations + 1):
        result = em_iteration(model, current, blocks, ctf, regulariser=regulariser,
                              chunk_size=chunk_size,
                              refine_iterations=refine_iterations)
        current = result.volume
        if callback is not None:
            callback(it, result)
    return current
