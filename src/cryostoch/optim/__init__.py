"""Stochastic optimisers of the paper (section 4), torch.optim-style.

Every optimiser subclasses :class:`torch.optim.Optimizer`, keeps all its state in
``state_dict()``, takes ``step(closure)`` (closure contract of ``torch.optim.LBFGS``: it zeroes
and recomputes ``.grad`` at the current parameters on the current minibatch and returns the
loss) and counts closure calls (``closure_calls``, ``last_step_closure_calls``) so that progress
can be measured in gradient evaluations as in the paper. ``make_optimizer`` builds them by name;
``lr=None`` picks the base learning rate from a measured curvature scale.
"""

from cryostoch.optim.base import CountingOptimizer
from cryostoch.optim.calibration import CurvatureEstimate, estimate_curvature_scale
from cryostoch.optim.factory import (
    OPTIMIZERS,
    PAPER_METHODS,
    PAPER_MINIBATCH_SIZE,
    canonical_name,
    make_optimizer,
)
from cryostoch.optim.first_order import SGD, AdaGrad, Adam, ClassicalMomentum, NesterovMomentum
from cryostoch.optim.hessian_free import HessianFree
from cryostoch.optim.lbfgs import OnlineLBFGS
from cryostoch.optim.schedules import annealed_lr, momentum_schedule
from cryostoch.optim.tonga import TONGA

__all__ = [
    "OPTIMIZERS",
    "PAPER_METHODS",
    "PAPER_MINIBATCH_SIZE",
    "SGD",
    "TONGA",
    "AdaGrad",
    "Adam",
    "ClassicalMomentum",
    "CountingOptimizer",
    "CurvatureEstimate",
    "HessianFree",
    "NesterovMomentum",
    "OnlineLBFGS",
    "annealed_lr",
    "canonical_name",
    "estimate_curvature_scale",
    "make_optimizer",
    "momentum_schedule",
]
