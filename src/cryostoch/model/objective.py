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
) -> ObjectiveValue:
    """Objective and (optionally) its gradient with respect to the real volume.

    `likelihood_weight` multiplies the data term (value and gradient): with a model whose noise
    sigma is inflated by sqrt(T) (a posterior temperature T), weight T keeps the data term's
    curvature that of T = 1 while the pose posteriors stay broad (annealing).

    With `preconditioner` (a real, non-negative array on the volume's spectrum block, see
    `fourier_preconditioner`), the likelihood part of the returned gradient is
    F^H diag(preconditioner) F-applied: a fixed change of metric that gives every frequency a
    comparable curvature; the prior part is left as it is. Without it, the exact gradient.
    """
    if n_training_images < 1:
        raise ValueError("n_training_images must be >= 1")
    batch = blocks.shape[0]
    if compute_gradient:
        prior_value, prior_gradient = negative_log_prior_and_gradient(volume.detach(), prior)
        block = model.volume_dft.volume(volume.detach()).requires_grad_(True)
        with torch.enable_grad():
            slices = model.slices_from_block(block)
        result = model.evaluate(slices, blocks, ctf, gradient_scale=likelihood_weight / batch)
        # d(mean nll)/dS from the GEMMs, pushed back through the slice extraction (autograd:
        # its backward is the insertion) and the pruned DFT (its explicit adjoint).
        (block_gradient,) = torch.autograd.grad(
            slices, block, grad_outputs=result.slice_gradient.to(slices.dtype)
        )
        if preconditioner is not None:
            block_gradient = block_gradient * preconditioner
        gradient = model.volume_dft.volume_adjoint(block_gradient)
        gradient = gradient + prior_gradient / n_training_images
    else:
        prior_value = negative_log_prior(volume.detach(), prior)
        with torch.no_grad():
            result = model.evaluate(model.slices(volume), blocks, ctf)
        gradient = None
    mean_nll = result.nll.mean()
    value = likelihood_weight * mean_nll + prior_value.detach() / n_training_images
    return ObjectiveValue(value.detach(), mean_nll.detach(), prior_value.detach(), gradient, result)


def fourier_preconditioner(curvature: Tensor, relative_floor: float = 0.05) -> Tensor:
    """P(k) = H(k) / (H(k)^2 + (floor * max H)^2), scaled so that P = 1/H where H is largest.

    Approximately 1/H where the expected curvature H is well above the floor (so every
    covered frequency moves at a comparable rate) and going to 0 where nothing is measured
    (block entries beyond the cutoff), so the step stays bounded there.
    """
    h = curvature.clamp(min=0)
    floor = relative_floor * h.max()
    p = h / (h * h + floor * floor)
    return p * h.max()
