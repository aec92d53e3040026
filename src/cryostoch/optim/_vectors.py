"""Small helpers treating a list of tensors as one vector (device- and dtype-agnostic).

Scalar results (dot products, norms) come back as Python floats: the optimisers need them for
control flow (CG, curvature-pair tests), and one synchronisation per scalar is negligible next
to an evaluation of the objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    total = 0.0
    for x, y in zip(xs, ys, strict=True):
        total += float(torch.dot(x.reshape(-1), y.reshape(-1)))
    return total


def norm(xs: Sequence[Tensor]) -> float:
    return math.sqrt(max(dot(xs, xs), 0.0))


def numel(xs: Sequence[Tensor]) -> int:
    return sum(x.numel() for x in xs)


def clone(xs: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().clone(memory_format=torch.contiguous_format) for x in xs]


def zeros_like(xs: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x, memory_format=torch.contiguous_format) for x in xs]


def current_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each parameter (zeros where a parameter has none), not copied."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(torch.zeros_like(p))
        elif p.grad.is_sparse:
            raise RuntimeError("cryostoch optimisers do not support sparse gradients")
        else:
            out.append(p.grad)
    return out


def copy_into(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Make ``p.grad`` equal to ``grads`` (copied), allocating where needed."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.copy_(g)


def fd_perturbation_norm(params: Sequence[Tensor], fd_rel: float | None) -> float:
    """Norm of the parameter perturbation used by directional finite differences.

    ``fd_rel`` (default sqrt(machine epsilon) of the parameter dtype: 3.5e-4 in float32,
    1.5e-8 in float64) times ||x||, or times sqrt(number of entries) (an RMS of one) when the
    parameters are all zero.
    """
    if fd_rel is None:
        fd_rel = math.sqrt(torch.finfo(params[0].dtype).eps)
    scale = norm(params)
    if not scale > 0.0:
        scale = math.sqrt(max(numel(params), 1))
    return fd_rel * scale
