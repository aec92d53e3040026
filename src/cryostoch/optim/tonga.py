"""TONGA: natural gradient with a low-rank covariance of gradients (Le Roux, Manzagol and
Bengio 2008), as used in the paper (rank 20, refreshed every 20 iterations).

Exact formulation implemented here
----------------------------------
Let g_t be the minibatch gradient at step t (one closure call) and x the concatenation of all
parameters (n entries).

* Covariance. The uncentred covariance of gradients C (n x n) is represented by k' <= k
  (``rank``, 20) orthogonal columns, C = U U^T with U^T U = diag(Lambda). Between refreshes C is
  frozen; the gradients seen meanwhile are collected in a buffer. Every ``refresh_every`` (20)
  steps the new estimate is

      C <- gamma C + (1 - gamma) (1/b) sum_{i in buffer} g_i g_i^T,

  (``covariance_decay`` gamma, default 0: C is the second moment of the last b = 20 minibatch
  gradients) truncated to its best rank-k approximation: with W the (k' + b) x n matrix of the
  rows sqrt(gamma) U^T and sqrt((1-gamma)/b) g_i^T, eigendecompose the small Gram matrix
  W W^T = V Lambda V^T and keep U^T = V_k^T W for the k largest eigenvalues. Before the first
  refresh (t < 20) there is no C and the step is a plain gradient step.
* Regularisation. lambda = ``damping`` * Lambda_max (the largest eigenvalue of C), i.e. the
  regularisation parameter is relative to the covariance scale, which makes the method
  invariant to the scale of the objective (the paper tuned an absolute value by hand).
* Direction, by the Woodbury identity on the k' x k' (here diagonal) system:

      d = lambda (C + lambda I)^-1 g = g - U (U^T U + lambda I)^-1 U^T g
        = g - sum_j u_j (u_j . g) / (Lambda_j + lambda).

  The factor lambda in front of the natural-gradient direction (C + lambda I)^-1 g is a
  constant rescaling of the learning rate that puts it in SGD units: the preconditioner
  lambda (C + lambda I)^-1 has eigenvalues in [damping / (1 + damping), 1], equal to 1 outside
  the span of U, so a learning rate that is stable for SGD is stable here.
* Update x <- x - eta_t d with the annealed eta_t of the paper; ``lr=None``: eta_0 = 1 / L.

Memory: up to rank + refresh_every parameter-sized vectors (40 x 8 MB for a 128^3 float32 map).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    check_positive,
    check_unit_interval,
)
from cryostoch.optim.schedules import ANNEAL_POWER, PAPER_ANNEAL


class TONGA(CountingOptimizer):
    """Low-rank natural gradient (see the module docstring for the exact formulation).

    Parameters: ``rank`` k = 20, ``refresh_every`` b = 20, ``damping`` = 1.0 (lambda relative
    to the largest covariance eigenvalue), ``covariance_decay`` gamma = 0, annealed learning
    rate (``anneal`` = 1e-2). One closure call per step.
    """

    lr_constant = 1.0
    single_group = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lr: float | None = None, *, rank: int = 20, refresh_every: int = 20,
                 damping: float = 1.0, covariance_decay: float = 0.0,
                 anneal: float = PAPER_ANNEAL, anneal_power: float = ANNEAL_POWER,
                 fd_rel: float | None = None):
        defaults = dict(lr=check_lr(lr), rank=check_int(rank, "rank"),
                        refresh_every=check_int(refresh_every, "refresh_every"),
                        damping=check_positive(damping, "damping"),
                        covariance_decay=check_unit_interval(covariance_decay,
                                                             "covariance_decay"),
                        fd_rel=check_fd_rel(fd_rel), **anneal_defaults(anneal, anneal_power))
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- covariance state
    def _basis(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "basis" not in state:
            state["basis"] = p.new_zeros((0, *p.shape))
        return state["basis"]

    def _eigvals(self) -> list[float]:
        return self._global.get("eigvals", [])

    def regularisation(self) -> float | None:
        """The absolute lambda in use (None before the first refresh)."""
        return self._global.get("reg")

    def direction(self, grads: list[Tensor]) -> list[Tensor]:
        """d = lambda (C + lambda I)^-1 g for the current (frozen) covariance estimate."""
        params = self._params()
        lam = self._global.get("reg")
        eig = self._eigvals()
        if lam is None or not eig:
            return [g.clone() for g in grads]
        k = len(eig)
        coef = None
        for p, g in zip(params, grads, strict=True):
            c = self._basis(p).reshape(k, -1) @ g.reshape(-1)
            c = c.to(torch.float64)
            coef = c if coef is None else coef + c
        denom = torch.tensor(eig, dtype=torch.float64, device=coef.device) + lam
        z = coef / denom
        out = []
        for p, g in zip(params, grads, strict=True):
            basis = self._basis(p).reshape(k, -1)
            out.append(g - (z.to(g.dtype) @ basis).reshape(g.shape))
        return out

    def _refresh(self) -> None:
        group = self.param_groups[0]
        params = self._params()
        gamma = group["covariance_decay"]
        k_max = group["rank"]
        glob = self._global
        buffers = [self.state[p]["buffer"] for p in params]
        b = len(buffers[0])
        old_k = len(self._eigvals())
        rows_per_param = []
        for p, buf in zip(params, buffers, strict=True):
            pieces = []
            if gamma > 0.0 and old_k > 0:
                pieces.append(self._basis(p).reshape(old_k, -1) * math.sqrt(gamma))
            new = torch.stack([g.reshape(-1) for g in buf]) * math.sqrt((1.0 - gamma) / b)
            pieces.append(new)
            rows_per_param.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        gram = None
        for w in rows_per_param:
            m = (w @ w.T).to(torch.float64)
            gram = m if gram is None else gram + m
        gram = 0.5 * (gram + gram.T)
        evals, evecs = torch.linalg.eigh(gram.cpu())
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        tol = float(evals[0]) * gram.shape[0] * torch.finfo(params[0].dtype).eps \
            if evals.numel() else 0.0
        keep = [i for i in range(min(k_max, evals.numel()))
                if float(evals[i]) > max(tol, 0.0)]
        for p, w in zip(params, rows_per_param, strict=True):
            if keep:
                v = evecs[:, keep].to(device=w.device, dtype=w.dtype)
                basis = (v.T @ w).reshape(len(keep), *p.shape)
            else:
                basis = p.new_zeros((0, *p.shape))
            self.state[p]["basis"] = basis
            self.state[p]["buffer"] = []
        glob["eigvals"] = [float(evals[i]) for i in keep]
        glob["reg"] = group["damping"] * float(evals[0]) if keep else None
        glob["refreshes"] = int(glob.get("refreshes", 0)) + 1

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:
        counted = self._begin(closure)
        loss = self._evaluate(counted)
        self._ensure_lr(counted)
        group = self.param_groups[0]
        params = self._params()
        t = self.iteration
        grads = vec.current_grads(params)
        d = self.direction(grads)
        lr_t = self._lr_t(group, t)
        for p, g, di in zip(params, grads, d, strict=True):
            self.state[p].setdefault("buffer", []).append(g.detach().clone())
            p.add_(di, alpha=-lr_t)
        if len(self.state[params[0]]["buffer"]) >= group["refresh_every"]:
            self._refresh()
        self._end()
        return loss
