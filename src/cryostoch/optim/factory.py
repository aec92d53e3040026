"""``make_optimizer(name, params, lr=None, **options)``: the optimisers by name, or any
``torch.optim.Optimizer`` subclass by import path (``package.module:Class``,
:mod:`cryostoch.optim.external`).

Names (aliases in brackets) and defaults:

============  ====================  ===========================================================
name          class                 defaults (lr=None: learning rate from the curvature L)
============  ====================  ===========================================================
sgd           SGD                   eta_0 = 1 / L, annealed (1 + 1e-2 t)^-0.75
momentum      ClassicalMomentum     eta_0 = (1 - 0.9) / L, annealed; mu_t = paper schedule
  (cm)
nesterov      NesterovMomentum      as momentum; gradient at the look-ahead point
  (nag)
adagrad       AdaGrad               eta = 0.1 RMS(x) (RMS(g) / L from x = 0), eps 1e-10,
                                    not annealed; damping 0 (delta = d RMS(g_1), rate x 1 + d)
tonga         TONGA                 eta_0 = 1 / L, annealed; rank 20, refresh every 20,
                                    damping 1.0 (relative to the top covariance eigenvalue)
olbfgs        OnlineLBFGS           gain eta_0 = 0.1, annealed; m = 30, H^0 = 1 / L before
  (lbfgs)                           the first pair, lambda (damping) = 0.1 L
hf            HessianFree           step 1 (full CG step), 5 CG iterations, damping
  (hessian_free)                    lambda_0 = 1.0 L adapted by Levenberg-Marquardt, CG warm
                                    start x 0.95; the paper's minibatch is 300
adam          Adam                  eta = 0.05 RMS(x) (RMS(g) / L from x = 0),
                                    betas (0.9, 0.999), eps 1e-8, not annealed
============  ====================  ===========================================================

A caller that knows an upper bound of the curvature (the engine: the largest Gauss-Newton
eigenvalue, ``engine/step_size.py``) hands it over with ``supply_curvature_scale(L)``; then no
closure call is spent on L and the rates c / L above become 2 c / L (``base.BOUND_GAIN``).

Closure calls per step: 1 for sgd, momentum, nesterov, adagrad, tonga, adam; 2 for olbfgs;
1 + CG iterations (+1 warm start, +1 damping adaptation) for hf; the calibration of
``lr=None`` (or of olbfgs's H^0 / hf's damping) costs one more call at the first step.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from cryostoch.optim.base import CountingOptimizer
from cryostoch.optim.external import ExternalOptimizer, is_import_path, load_optimizer_class
from cryostoch.optim.first_order import SGD, AdaGrad, Adam, ClassicalMomentum, NesterovMomentum
from cryostoch.optim.hessian_free import HessianFree
from cryostoch.optim.lbfgs import OnlineLBFGS
from cryostoch.optim.tonga import TONGA

OPTIMIZERS: dict[str, type[CountingOptimizer]] = {
    "sgd": SGD,
    "momentum": ClassicalMomentum,
    "nesterov": NesterovMomentum,
    "adagrad": AdaGrad,
    "tonga": TONGA,
    "olbfgs": OnlineLBFGS,
    "hf": HessianFree,
    "adam": Adam,
}

ALIASES: dict[str, str] = {
    "cm": "momentum",
    "nag": "nesterov",
    "lbfgs": "olbfgs",
    "hessian_free": "hf",
    "hessian-free": "hf",
}

#: Minibatch sizes used in the paper (section 4): 100, except 300 for Hessian-free.
PAPER_MINIBATCH_SIZE: dict[str, int] = {name: (300 if name == "hf" else 100)
                                        for name in OPTIMIZERS}

#: The paper's seven methods (Adam is a modern reference, not in the paper).
PAPER_METHODS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adagrad", "tonga",
                                  "olbfgs", "hf")


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        known = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"unknown optimiser {name!r}; choose one of: {known}")
    return key


def make_optimizer(name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                   lr: float | None = None, **options: Any) -> CountingOptimizer:
    """Build the optimiser ``name`` (see the module table) on ``params``.

    ``lr=None`` chooses the base learning rate from a curvature measurement at the first step
    (see :mod:`cryostoch.optim.calibration`); other keyword options go to the class (an
    unknown option raises ``ValueError``).
    """
    if is_import_path(name):  # a torch.optim.Optimizer subclass named by import path
        return ExternalOptimizer(params, lr, optimizer_class=load_optimizer_class(name),
                                 **options)
    cls = OPTIMIZERS[canonical_name(name)]
    accepted = {k for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for optimiser {name!r}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return cls(params, lr, **options)
