"""The paper's sparsity prior on voxel values (section 3).

-log p(V_i) = lambda_plus * V_i            for V_i >= 0   (exponential: sparsity)
            = lambda_minus * |V_i|^beta    for V_i < 0    (generalised normal: soft positivity)
up to a constant. beta = 1 is the paper's printed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorConfig:
    lambda_plus: float = 1e-4
    lambda_minus: float = 1e-4
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.lambda_plus < 0 or self.lambda_minus < 0:
            raise ValueError("prior strengths lambda_plus and lambda_minus must be >= 0")
        if not self.beta >= 1:
            raise ValueError(f"prior exponent beta must be >= 1, got {self.beta}")


def negative_log_prior(volume: Tensor, prior: PriorConfig) -> Tensor:
    """Sum over voxels of -log p(V_i) (a 0-dim tensor, differentiable)."""
    if prior.beta == 1.0:  # one pass: sum|V-| = sum V+ - sum V
        positive_sum = torch.clamp(volume, min=0).sum()
        return prior.lambda_plus * positive_sum + prior.lambda_minus * (positive_sum - volume.sum())
    positive = torch.clamp(volume, min=0)
    negative = torch.clamp(volume, max=0).abs()
    return prior.lambda_plus * positive.sum() + prior.lambda_minus * negative.pow(prior.beta).sum()


def negative_log_prior_gradient(volume: Tensor, prior: PriorConfig) -> Tensor:
    """d(-log p(V))/dV, written out (cheaper than autograd over every voxel).

    At V_i = 0 the subgradient of the positive branch (lambda_plus) is used.
    """
    if prior.beta == 1.0:  # lambda_plus - (lambda_plus + lambda_minus) [V < 0], in two passes
        negative = volume < 0
        return torch.where(negative, -prior.lambda_minus, prior.lambda_plus).to(volume.dtype)
    negative = volume < 0
    magnitude = volume.abs().pow(prior.beta - 1) * (prior.lambda_minus * prior.beta)
    return torch.where(negative, -magnitude, torch.full_like(volume, prior.lambda_plus))


def negative_log_prior_and_gradient(volume: Tensor, prior: PriorConfig) -> tuple[Tensor, Tensor]:
    """(-log p(V), its gradient) together; for beta = 1 the value is <V, gradient>, so one
    pass over the voxels builds the gradient and a dot product gives the value."""
    gradient = negative_log_prior_gradient(volume, prior)
    if prior.beta == 1.0:
        return torch.dot(volume.reshape(-1), gradient.reshape(-1)), gradient
    return negative_log_prior(volume, prior), gradient
