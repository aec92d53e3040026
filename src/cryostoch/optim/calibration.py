"""Default learning rates from a measured curvature scale.

The paper tuned every base learning rate by hand on a subset of the data and names that its
main limitation. Here an optimiser constructed with ``lr=None`` measures, at its first step and
on the first minibatch, the curvature of the objective along the gradient with one extra
gradient evaluation (a directional finite difference of gradients on the same minibatch):

    u = g / ||g||,   H u ~= (grad f(x + h u) - grad f(x)) / h,
    L = ||H u||      (= ||H g|| / ||g||; the Rayleigh quotient <u, H u> is reported too),

and turns it into ``base_lr = c_method / L`` with a per-method constant (see each optimiser's
``lr_constant`` and :mod:`cryostoch.optim.factory`). For a convex quadratic both ``L`` and the
Rayleigh quotient lie between the smallest and the largest eigenvalue of the Hessian; since
the gradient of a quadratic weights each eigendirection by its eigenvalue, ``L`` tends
towards the largest one, which is the eigenvalue that limits a stable gradient step
(``lr < 2 / lambda_max``). ``power_iterations > 1`` refines ``L`` towards ``lambda_max`` with
one more gradient evaluation each.

In cryo-EM's marginal likelihood the Hessian is indefinite (the marginal over poses adds a
negative curvature), and ``||H u||`` counts it too; the engine therefore supplies its own
Gauss-Newton bound instead (``engine/step_size.py``); this estimate stays the fallback for
any other objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.optim import _vectors as vec


@dataclass(frozen=True)
class CurvatureEstimate:
    """Result of :func:`estimate_curvature_scale`.

    ``scale`` = ||H u|| (the value the optimisers use), ``rayleigh`` = <u, H u>, for the unit
    vector u of the last power iteration (the normalised gradient when power_iterations = 1);
    ``closure_calls`` = gradient evaluations spent (minibatch gradients);
    ``grad_norm`` / ``grad_rms`` = norm / RMS of the gradient at the current point.
    """

    scale: float
    rayleigh: float
    closure_calls: int
    grad_norm: float
    grad_rms: float

    def __float__(self) -> float:
        return self.scale


def estimate_curvature_scale(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None,
    *,
    fd_rel: float | None = None,
    power_iterations: int = 1,
) -> CurvatureEstimate:
    """Curvature of the objective along the gradient, by directional finite differences.

    ``closure`` follows the optimiser contract: it zeroes and recomputes ``.grad`` of
    ``params`` at their current values on the current minibatch and returns the loss.
    ``grads`` are the gradients at the current point if already known (then the estimate
    costs ``power_iterations`` closure calls; otherwise one more to compute them).
    The perturbation has norm ``fd_rel * ||x||`` (see ``_vectors.fd_perturbation_norm``).
    The parameters are restored exactly, and their ``.grad`` reset to the gradient at the
    current point, before returning.
    """
    params = list(params)
    if not params:
        raise ValueError("estimate_curvature_scale needs at least one parameter tensor")
    if isinstance(power_iterations, bool) or int(power_iterations) != power_iterations \
            or power_iterations < 1:
        raise ValueError(f"power_iterations must be an integer >= 1, got {power_iterations!r}")
    if fd_rel is not None and not fd_rel > 0:
        raise ValueError(f"fd_rel must be > 0, got {fd_rel}")
    calls = 0
    with torch.no_grad():
        if grads is None:
            with torch.enable_grad():
                closure()
            calls += 1
            grads = vec.current_grads(params)
        g0 = vec.clone(grads)
        gnorm = vec.norm(g0)
        grms = gnorm / math.sqrt(max(vec.numel(params), 1))
        if not math.isfinite(gnorm):
            raise RuntimeError("the gradient is not finite; cannot estimate the curvature")
        if gnorm == 0.0:
            raise RuntimeError("the gradient is exactly zero; cannot estimate the curvature "
                               "along it (pass lr explicitly)")
        x0 = vec.clone(params)
        h = vec.fd_perturbation_norm(params, fd_rel)
        u = [g / gnorm for g in g0]
        scale = rayleigh = float("nan")
        try:
            for _ in range(int(power_iterations)):
                for p, x, ui in zip(params, x0, u, strict=True):
                    p.copy_(x).add_(ui, alpha=h)
                with torch.enable_grad():
                    closure()
                calls += 1
                hu = [(gn - g) / h for gn, g in zip(vec.current_grads(params), g0, strict=True)]
                scale = vec.norm(hu)
                rayleigh = vec.dot(u, hu)
                if not (math.isfinite(scale) and scale > 0.0):
                    break
                u = [v / scale for v in hu]
        finally:
            vec.copy_into(params, x0)
            vec.set_grads(params, g0)
    return CurvatureEstimate(scale=scale, rayleigh=rayleigh, closure_calls=calls,
                             grad_norm=gnorm, grad_rms=grms)
