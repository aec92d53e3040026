"""Hessian-free optimisation (Martens 2010) with finite-difference Hessian-vector products,
as in the paper (5 CG iterations, Tikhonov damping; minibatch 300 is the engine's business).

Step t on minibatch B (all closure calls on B):

1. g = grad f_B(x)                                                     (1 call)
2. Solve (H + lambda I) d = -g approximately by conjugate gradients, with
   - H v by a forward directional finite difference of gradients on the same minibatch,
     H v ~= (grad f_B(x + e v) - g) / e,  e = fd_rel ||x|| / ||v||         (1 call each)
     (fd_rel defaults to sqrt(machine epsilon) of the dtype; the parameters are restored
     exactly after each product),
   - warm start from the previous step's solution times ``cg_decay`` (0.95, Martens'
     choice); a nonzero start costs one product for its residual,
   - ``cg_iters`` (5) iterations, stopping early on a residual below ``cg_tol`` * ||g|| or on
     non-positive curvature p^T (H + lambda I) p <= 0 (the last iterate is kept).
3. x <- x + eta d (``lr`` eta = 1 by default: the full CG step; not annealed by default).
4. Levenberg-Marquardt adjustment (``adapt_damping``): evaluate f_B(x + eta d) (1 call) and
   the reduction ratio rho = (f_B(x + eta d) - f_B(x)) / (q(eta d) - q(0)) against the
   undamped quadratic model q(s) = g^T s + 1/2 s^T H s (s^T H s is obtained from the CG
   residual, at no extra cost); lambda <- lambda * ``boost`` (3/2) if rho < 1/4,
   lambda <- lambda * ``drop`` (2/3) if rho > 3/4, never below ``min_damping``. With
   ``reject_uphill`` a step that increases the minibatch loss is undone (the parameters go
   back to x; the damping has been raised).

Closure calls per step: 1 + (1 if warm-started) + CG iterations done + (1 if adapt_damping),
plus one at the first step when the initial damping is calibrated (``damping=None``:
lambda_0 = 1.0 * L, L the measured curvature scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from cryostoch.optim import _vectors as vec
from cryostoch.optim.base import (
    Closure,
    CountingOptimizer,
    anneal_defaults,
    check_fd_rel,
    check_int,
    check_lr,
    check_nonneg,
    check_unit_interval,
)
from cryostoch.optim.calibration import CurvatureEstimate
from cryostoch.optim.schedules import ANNEAL_POWER

#: lambda_0 = DAMPING_REL * L when ``damping`` is None.
DAMPING_REL = 1.0


class HessianFree(CountingOptimizer):
    """Hessian-free Newton-CG with damping (see the module docstring).

    Parameters: ``cg_iters`` = 5, ``damping`` (initial lambda; None: 1.0 L), ``cg_decay`` =
    0.95, ``cg_tol`` = 0, ``adapt_damping`` = True, ``boost`` = 1.5, ``drop`` = 2/3,
    ``min_damping`` = 0, ``reject_uphill`` = True, ``lr`` = 1 (None means 1), ``anneal`` = 0.
    """

    lr_constant = 1.0
    single_group = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lr: float | None = None, *, cg_iters: int = 5, damping: float | None = None,
                 cg_decay: float = 0.95, cg_tol: float = 0.0, adapt_damping: bool = True,
                 boost: float = 1.5, drop: float = 2.0 / 3.0, min_damping: float = 0.0,
                 reject_uphill: bool = True, anneal: float = 0.0,
                 anneal_power: float = ANNEAL_POWER, fd_rel: float | None = None):
        if not (isinstance(boost, (int, float)) and math.isfinite(boost) and boost >= 1.0):
            raise ValueError(f"boost must be a finite number >= 1, got {boost!r}")
        if not (isinstance(drop, (int, float)) and 0.0 < drop <= 1.0):
            raise ValueError(f"drop must lie in (0, 1], got {drop!r}")
        defaults = dict(lr=check_lr(lr), cg_iters=check_int(cg_iters, "cg_iters"),
                        damping=None if damping is None else check_nonneg(damping, "damping"),
                        cg_decay=check_unit_interval(cg_decay, "cg_decay", closed_right=True),
                        cg_tol=check_nonneg(cg_tol, "cg_tol"),
                        adapt_damping=bool(adapt_damping), boost=float(boost),
                        drop=float(drop), min_damping=check_nonneg(min_damping, "min_damping"),
                        reject_uphill=bool(reject_uphill), fd_rel=check_fd_rel(fd_rel),
                        **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)

    def _default_lr(self, group: dict[str, Any],
                    curvature: Callable[[], CurvatureEstimate]) -> float:
        return self.lr_constant

    @property
    def damping(self) -> float | None:
        """The current Tikhonov damping lambda (None before the first step)."""
        return self._global.get("damping")

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:
        counted = self._require_closure(
            self._begin(closure), "Hessian-free needs gradients at several points")
        group = self.param_groups[0]
        params = self._params()
        glob = self._global
        t = self.iteration
        loss0 = counted()
        g = vec.clone(vec.current_grads(params))
        if "damping" not in glob:
            if group["damping"] is None:
                glob["damping"] = DAMPING_REL * self._measure_curvature(counted).scale
            else:
                glob["damping"] = float(group["damping"])
        self._ensure_lr(counted)
        lam = float(glob["damping"])
        lr_t = self._lr_t(group, t)
        x0 = vec.clone(params)
        h = vec.fd_perturbation_norm(params, group["fd_rel"])

        def hvp(v: list[Tensor]) -> list[Tensor]:
            vn = vec.norm(v)
            if vn == 0.0:
                return vec.zeros_like(v)
            e = h / vn
            try:
                for p, x, vi in zip(params, x0, v, strict=True):
                    p.copy_(x).add_(vi, alpha=e)
                counted()
                return [(gn - go).div_(e) for gn, go in
                        zip(vec.current_grads(params), g, strict=True)]
            finally:
                vec.copy_into(params, x0)

        d, r, iters, negative_curvature = self._conjugate_gradients(group, params, g, hvp, lam)

        # ---- undamped model value q(lr d) from the CG residual r = -g - (H + lam) d
        gd = vec.dot(g, d)
        dd = vec.dot(d, d)
        dhd = -gd - vec.dot(d, r) - lam * dd
        predicted = lr_t * gd + 0.5 * lr_t * lr_t * dhd

        rho = float("nan")
        rejected = False
        if dd == 0.0:
            if group["adapt_damping"]:
                lam = max(lam * group["boost"], group["min_damping"])
        else:
            for p, x, di in zip(params, x0, d, strict=True):
                p.copy_(x).add_(di, alpha=lr_t)
            if group["adapt_damping"]:
                loss1 = counted()
                if loss0 is None or loss1 is None:
                    raise RuntimeError("Hessian-free damping adaptation needs the closure to "
                                       "return the loss")
                f0, f1 = float(loss0), float(loss1)
                rho = (f1 - f0) / predicted if predicted < 0.0 else -math.inf
                if not rho >= 0.25:
                    lam = lam * group["boost"]
                elif rho > 0.75:
                    lam = lam * group["drop"]
                lam = max(lam, group["min_damping"])
                if group["reject_uphill"] and not f1 <= f0:
                    vec.copy_into(params, x0)
                    rejected = True
        for p, di in zip(params, d, strict=True):
            self.state[p]["direction"] = di
        glob["damping"] = float(lam)
        glob["last_rho"] = float(rho)
        glob["last_cg_iters"] = iters
        glob["last_negative_curvature"] = bool(negative_curvature)
        glob["rejected_steps"] = int(glob.get("rejected_steps", 0)) + int(rejected)
        self._end()
        return loss0

    def _conjugate_gradients(self, group, params, g, hvp, lam):
        """Truncated CG on (H + lam I) d = -g, warm-started from the decayed last direction.

        Returns (d, the residual r = -g - (H + lam) d, iterations, negative curvature met).
        """
        d_prev = [self.state[p].get("direction") for p in params]
        if group["cg_decay"] > 0.0 and all(x is not None for x in d_prev):
            d = [x.mul(group["cg_decay"]) for x in d_prev]
            bd = hvp(d)
            r = [-gi - bdi - lam * di for gi, bdi, di in zip(g, bd, d, strict=True)]
        else:
            d = vec.zeros_like(g)
            r = [-gi for gi in g]
        rr = vec.dot(r, r)
        direction = vec.clone(r)
        gnorm = vec.norm(g)
        iters = 0
        negative_curvature = False
        for _ in range(group["cg_iters"]):
            if rr == 0.0 or math.sqrt(rr) <= group["cg_tol"] * gnorm:
                break
            bp = hvp(direction)
            ap = [bpi.add_(pi, alpha=lam) for bpi, pi in zip(bp, direction, strict=True)]
            pap = vec.dot(direction, ap)
            iters += 1
            if not (math.isfinite(pap) and pap > 0.0):
                negative_curvature = True
                break
            alpha = rr / pap
            for di, pi in zip(d, direction, strict=True):
                di.add_(pi, alpha=alpha)
            for ri, api in zip(r, ap, strict=True):
                ri.add_(api, alpha=-alpha)
            rr_new = vec.dot(r, r)
            beta = rr_new / rr
            for pi, ri in zip(direction, r, strict=True):
                pi.mul_(beta).add_(ri)
            rr = rr_new

        return d, r, iters, negative_curvature
