"""The stochastic MAP objective (paper eq. 6) for a minibatch, with its gradient.

f(V) = mean_{i in batch} nll_i(V) + (1 / K) * (-log p(V)),  K = number of training images,
so that the expectation over minibatches equals the full objective divided by K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.model.likelihood import LikelihoodResult, MarginalLikelihood
from cryostoch.model.prior import (
    PriorConfig,
    negative_log_prior,
    negative_log_prior_and_gradient,
)
from cryostoch.operators.ctf import CtfParameters


@dataclass
class ObjectiveValue:
    value: Tensor  # 0-dim: mean nll + prior / K
    mean_nll: Tensor
    prior: Tensor  # -log p(V)
    gradient: Tensor | None
    likelihood: LikelihoodResult


def minibatch_objective(
    volume: Tensor,
    blocks: Tensor,
    ctf: CtfParameters,
    model: MarginalLikelihood,
    prior: PriorConfig,
    n_training_images: int,
    *,
    compute_gradient: bool = True,
    preconditioner: Tensor | None = None,
    likelihood_weight: float = 1.0,
    noise_precision: Tensor | None = None,
    class_log_weights: Tensor | None = None,
    batch_total: int | None = None,
    sum_over_shares: Callable[[Tensor], Tensor] | None = None,
) -> ObjectiveValue:
    """Objective and (optionally) its gradient with respect to the real volume.

    `likelihood_weight` multiplies the data term (value and gradient): with a model whose noise
    sigma is inflated by sqrt(T) (a posterior temperature T), weight T keeps the data term's
    curvature that of T = 1 while the pose posteriors stay broad (annealing).

    With `preconditioner` (a real, non-negative array on the volume's spectrum block, see
    `cryostoch.model.curvature.fourier_preconditioner`), the likelihood part of the returned
    gradient is F^H diag(preconditioner) F-applied: a fixed change of metric that gives every
    frequency a comparable curvature; the prior part is left as it is. Without it, the exact
    gradient.

    `noise_precision`: (B, M) or (M,) per-coefficient noise precision (coloured noise);
    `class_log_weights`: (K,) log class proportions when `volume` is (K, N, N, N); see
    `MarginalLikelihood.evaluate`.

    Data parallel: `blocks` may be one share of a minibatch of `batch_total` images, the
    other shares evaluated elsewhere; `sum_over_shares` (in place, e.g. an all-reduce) then
    sums the shares' likelihood gradients and NLL sums before the prior is added once, so
    every share gets the whole minibatch's value and gradient. Without it, `blocks` is the
    whole minibatch.
    """
    if n_training_images < 1:
        raise ValueError("n_training_images must be >= 1")
    batch = blocks.shape[0] if batch_total is None else batch_total
    if compute_gradient:
        prior_value, prior_gradient = negative_log_prior_and_gradient(volume.detach(), prior)
        result, gradient = model.nll_and_gradient(volume, blocks, ctf,
                                                  gradient_scale=likelihood_weight / batch,
                                                  preconditioner=preconditioner,
                                                  noise_precision=noise_precision,
                                                  class_log_weights=class_log_weights)
        if sum_over_shares is not None:
            gradient = sum_over_shares(gradient)
        gradient = gradient + prior_gradient / n_training_images
    else:
        prior_value = negative_log_prior(volume.detach(), prior)
        with torch.no_grad():
            result = model.evaluate(model.slices(volume), blocks, ctf,
                                    noise_precision=noise_precision,
                                    class_log_weights=class_log_weights)
        gradient = None
    if sum_over_shares is None:
        mean_nll = result.nll.mean()
    else:
        mean_nll = (sum_over_shares(result.nll.double().sum()) / batch).to(result.nll.dtype)
    value = likelihood_weight * mean_nll + prior_value.detach() / n_training_images
    return ObjectiveValue(value.detach(), mean_nll.detach(), prior_value.detach(), gradient, result)
