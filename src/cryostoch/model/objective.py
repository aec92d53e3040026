"""The stochastic MAP objective (paper eq. 6) for a minibatch, with its gradient.

f(V) = mean_{i in batch} nll_i(V) + (1 / K) * (-log p(V)),  K = number of training images,
so that the expectation over minibatches equals the full objective divided by K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.model.likelihood import LikelihoodResult, MarginalLikelihood
from cryostoch.model.prior import (
    PriorConfig,
    negative_log_prior,
    negative_log_prior_gradient,
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
) -> ObjectiveValue:
    """Objective and (optionally) its exact gradient with respect to the real volume."""
    if n_training_images < 1:
        raise ValueError("n_training_images must be >= 1")
    batch = blocks.shape[0]
    prior_value = negative_log_prior(volume.detach(), prior)
    if compute_gradient:
        v = volume.detach().requires_grad_(True)
        with torch.enable_grad():
            slices = model.slices(v)
        result = model.evaluate(slices, blocks, ctf, gradient_scale=1.0 / batch)
        # d(mean nll)/dS from the GEMMs, pushed back through the slice extraction and the
        # pruned DFT by autograd (its backward is the exact adjoint: insertion, inverse DFT).
        (gradient,) = torch.autograd.grad(
            slices, v, grad_outputs=result.slice_gradient.to(slices.dtype)
        )
        gradient = gradient + negative_log_prior_gradient(volume, prior) / n_training_images
    else:
        with torch.no_grad():
            result = model.evaluate(model.slices(volume), blocks, ctf)
        gradient = None
    mean_nll = result.nll.mean()
    value = mean_nll + prior_value.detach() / n_training_images
    return ObjectiveValue(value.detach(), mean_nll.detach(), prior_value.detach(), gradient, result)
