"""First-order methods: SGD, classical momentum, Nesterov, AdaGrad, Adam.

All use one closure call (one minibatch gradient) per step. The learning rate of SGD, CM and
NAG is annealed as in the paper, eta_t = eta_0 (1 + anneal t)^-0.75 with anneal = 1e-2; AdaGrad
and Adam are not annealed by default (``anneal=0``).
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
    check_lr,
    check_nonneg,
    check_unit_interval,
    param_rms,
)
from cryostoch.optim.calibration import CurvatureEstimate
from cryostoch.optim.schedules import (
    ANNEAL_POWER,
    PAPER_ANNEAL,
    PAPER_MOMENTUM_MAX,
    momentum_schedule,
)

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


class SGD(CountingOptimizer):
    """Plain stochastic gradient descent, x <- x - eta_t g.

    ``lr=None``: eta_0 = 1 / L (``lr_constant = 1``), L the measured curvature scale.
    With ``anneal=0`` it coincides with ``torch.optim.SGD(lr=lr)``.
    """

    lr_constant = 1.0

    def __init__(self, params: Params, lr: float | None = None, *,
                 anneal: float = PAPER_ANNEAL, anneal_power: float = ANNEAL_POWER,
                 fd_rel: float | None = None):
        defaults = dict(lr=check_lr(lr), fd_rel=check_fd_rel(fd_rel),
                        **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._begin(closure)
        loss = self._evaluate(counted)
        self._ensure_lr(counted)
        t = self.iteration
        for group in self.param_groups:
            lr_t = self._lr_t(group, t)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr_t)
        self._end()
        return loss


def _check_momentum(momentum: float | None) -> float | None:
    if momentum is None:
        return None
    return check_unit_interval(momentum, "momentum")


class _MomentumBase(CountingOptimizer):
    def __init__(self, params: Params, lr: float | None = None, *,
                 momentum: float | None = None, mu_max: float = PAPER_MOMENTUM_MAX,
                 anneal: float = PAPER_ANNEAL, anneal_power: float = ANNEAL_POWER,
                 fd_rel: float | None = None):
        defaults = dict(lr=check_lr(lr), momentum=_check_momentum(momentum),
                        mu_max=check_unit_interval(mu_max, "mu_max"),
                        fd_rel=check_fd_rel(fd_rel), **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_momentum(group["momentum"])
            check_unit_interval(group["mu_max"], "mu_max")

    @staticmethod
    def _mu_t(group: dict[str, Any], t: int) -> float:
        if group["momentum"] is not None:
            return float(group["momentum"])
        return momentum_schedule(t, group["mu_max"])

    def _lr_constant(self, group: dict[str, Any]) -> float:
        """c = 1 - mu_max: in steady state the velocity is eta g / (1 - mu) = g / L."""
        mu = group["momentum"] if group["momentum"] is not None else group["mu_max"]
        return 1.0 - mu


class ClassicalMomentum(_MomentumBase):
    """Classical (heavy-ball) momentum in the form of Sutskever et al. (2013):

        v_{t+1} = mu_t v_t - eta_t grad f(x_t),   x_{t+1} = x_t + v_{t+1},

    with mu_t the paper's schedule min(0.9, 1 - 2^(-1 - log2(floor(t/100) + 1))) unless a
    constant ``momentum`` is given. ``lr=None``: eta_0 = (1 - mu_max) / L.
    With a constant lr and momentum this equals ``torch.optim.SGD(lr, momentum)`` up to
    rounding (torch keeps v / (-lr) instead of v).
    """

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._begin(closure)
        loss = self._evaluate(counted)
        self._ensure_lr(counted)
        t = self.iteration
        for group in self.param_groups:
            lr_t = self._lr_t(group, t)
            mu_t = self._mu_t(group, t)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                v = state.get("velocity")
                if v is None:
                    v = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["velocity"] = v
                v.mul_(mu_t).add_(p.grad, alpha=-lr_t)
                p.add_(v)
        self._end()
        return loss


class NesterovMomentum(_MomentumBase):
    """Nesterov's accelerated gradient in the formulation of Sutskever et al. (2013):

        v_{t+1} = mu_t v_t - eta_t grad f(x_t + mu_t v_t),   x_{t+1} = x_t + v_{t+1}.

    Implemented literally, without reparametrisation: the parameters are moved to the
    look-ahead point x_t + mu_t v_t, the closure is called there (one call), and they are
    restored exactly (copied back) before the update. Between steps the parameters therefore
    hold x_t, the non-look-ahead iterate; ``step`` returns the loss at the look-ahead point and
    leaves the look-ahead gradient in ``.grad``. (With constant lr and momentum the look-ahead
    points are exactly the iterates of ``torch.optim.SGD(nesterov=True)``, which uses the
    reparametrisation y_t = x_t + mu v_t.) ``lr=None``: eta_0 = (1 - mu_max) / L.
    """

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._require_closure(
            self._begin(closure), "Nesterov evaluates the gradient at the look-ahead point")
        t = self.iteration
        saved: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            mu_t = self._mu_t(group, t)
            for p in group["params"]:
                v = self.state[p].get("velocity")
                if v is not None and mu_t != 0.0:
                    saved.append((p, p.detach().clone()))
                    p.add_(v, alpha=mu_t)
        try:
            loss = counted()
            # calibration (first step only) measures around the point the gradient belongs to
            self._ensure_lr(counted)
        finally:
            for p, x in saved:
                p.copy_(x)
        for group in self.param_groups:
            lr_t = self._lr_t(group, t)
            mu_t = self._mu_t(group, t)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                v = state.get("velocity")
                if v is None:
                    v = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["velocity"] = v
                v.mul_(mu_t).add_(p.grad, alpha=-lr_t)
                p.add_(v)
        self._end()
        return loss


def _rms_scaled_lr(params: list[Tensor], c: float,
                   curvature: Callable[[], CurvatureEstimate]) -> float:
    """c * RMS(x); when the parameters are all zero, RMS(g) / L (the RMS of the first step
    SGD would take with lr = 1 / L)."""
    rms = param_rms(params)
    if rms > 0.0:
        return c * rms
    est = curvature()
    return est.grad_rms / est.scale


class AdaGrad(CountingOptimizer):
    """Diagonal AdaGrad (Duchi et al. 2011), mirroring ``torch.optim.Adagrad``:

        G <- G + g*g,   x <- x - eta_t g / (sqrt(G) + eps).

    Not annealed by default (as in the paper). ``lr=None``: the first step moves every
    coordinate by about eta, so eta = 0.1 * RMS(x) (``lr_constant``), relative to the
    parameters' own scale; from an all-zero start eta = RMS(g) / L instead (the RMS of SGD's
    first step; one extra closure call).

    ``damping`` d (default 0: the plain method above): Duchi et al.'s delta, relative,
    delta = d * RMS(g_1) of the first minibatch gradient, with the rate scaled by (1 + d),

        x <- x - eta_t (1 + d) g / (sqrt(G) + eps + delta),

    so that a typical coordinate's first step stays about eta whatever d (and a grid over d
    needs no other rates). Why: the plain first step moves every voxel by about eta, those
    the data barely constrain (tiny g) as far as the rest, and the noise it leaves stays;
    delta caps the gain 1 / sqrt(G) there. Measured on the paper's synthetic set at 1/10
    scale (seed 2, whole runs; eps = 0.015, 0.05, 0.15 there, i.e. d = 1, 3.3, 10 of RMS(g_1)
    = 0.015): d = 0 at the tuned 8x rate ended at FSC 0.5 of 1.55x the cutoff, d = 1, 3.3
    and 10 at eta 8x, 7.4x, 5.8x at 1.29, 0.98 and 0.92x (held-out NLL 200.7 -> 190.7).
    """

    lr_constant = 0.1

    def __init__(self, params: Params, lr: float | None = None, *, eps: float = 1e-10,
                 damping: float = 0.0, initial_accumulator_value: float = 0.0,
                 anneal: float = 0.0, anneal_power: float = ANNEAL_POWER,
                 fd_rel: float | None = None):
        defaults = dict(lr=check_lr(lr), eps=check_nonneg(eps, "eps"),
                        damping=check_nonneg(damping, "damping"),
                        initial_accumulator_value=check_nonneg(initial_accumulator_value,
                                                               "initial_accumulator_value"),
                        fd_rel=check_fd_rel(fd_rel), **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)

    def _default_lr(self, group: dict[str, Any], curvature: Callable[[], CurvatureEstimate]
                    ) -> float:
        return _rms_scaled_lr(list(group["params"]), self.lr_constant, curvature)

    def _delta(self) -> float:
        """RMS of the first step's gradient over all parameters (the unit of ``damping``),
        measured once and kept in the checkpoint."""
        glob = self._global
        if "first_grad_rms" not in glob:
            grads = [p.grad for p in self._params() if p.grad is not None]
            glob["first_grad_rms"] = (vec.norm(grads) / math.sqrt(max(vec.numel(grads), 1))
                                      if grads else 0.0)
        return float(glob["first_grad_rms"])

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._begin(closure)
        loss = self._evaluate(counted)
        delta = self._delta()  # from this gradient, before any calibrating call
        self._ensure_lr(counted)
        t = self.iteration
        for group in self.param_groups:
            lr_t = self._lr_t(group, t) * (1.0 + group["damping"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                acc = state.get("sum")
                if acc is None:
                    acc = torch.full_like(p, group["initial_accumulator_value"],
                                          memory_format=torch.preserve_format)
                    state["sum"] = acc
                g = p.grad
                acc.addcmul_(g, g, value=1)
                std = acc.sqrt().add_(group["eps"] + group["damping"] * delta)
                p.addcdiv_(g, std, value=-lr_t)
        self._end()
        return loss


class Adam(CountingOptimizer):
    """Adam (Kingma & Ba 2015), a modern reference; mirrors ``torch.optim.Adam``
    (single-tensor path, no weight decay, no amsgrad) operation for operation.

    Not annealed by default. ``lr=None``: eta = 0.05 * RMS(x) (``lr_constant``; Adam moves each
    coordinate by about eta per step while gradients agree), or RMS(g) / L from an all-zero
    start.
    """

    lr_constant = 0.05

    def __init__(self, params: Params, lr: float | None = None, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 anneal: float = 0.0, anneal_power: float = ANNEAL_POWER,
                 fd_rel: float | None = None):
        b1, b2 = betas
        defaults = dict(lr=check_lr(lr), betas=(check_unit_interval(b1, "beta1"),
                                                check_unit_interval(b2, "beta2")),
                        eps=check_nonneg(eps, "eps"), fd_rel=check_fd_rel(fd_rel),
                        **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)

    def _default_lr(self, group: dict[str, Any], curvature: Callable[[], CurvatureEstimate]
                    ) -> float:
        return _rms_scaled_lr(list(group["params"]), self.lr_constant, curvature)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._begin(closure)
        loss = self._evaluate(counted)
        self._ensure_lr(counted)
        t = self.iteration
        for group in self.param_groups:
            lr_t = self._lr_t(group, t)
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["adam_step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                state["adam_step"] += 1
                k = state["adam_step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** float(k)
                bias_correction2 = 1 - beta2 ** float(k)
                step_size = lr_t / bias_correction1
                denom = (v.sqrt() / bias_correction2 ** 0.5).add_(group["eps"])
                p.addcdiv_(m, denom, value=-step_size)
        self._end()
        return loss


__all__ = ["SGD", "ClassicalMomentum", "NesterovMomentum", "AdaGrad", "Adam"]
