"""Common machinery of the cryostoch optimisers.

Every optimiser is a :class:`torch.optim.Optimizer` with ``step(closure)``. The closure contract
is that of :class:`torch.optim.LBFGS`: ``closure()`` zeroes and recomputes ``.grad`` of the
parameters at their current values on the current minibatch and returns the loss (a 0-dim
tensor). Optimisers that need more gradients on the same minibatch (online L-BFGS, Hessian-free,
the learning-rate calibration) call it again after temporarily changing the parameters and
restore them exactly afterwards.

Counting. Each call of the closure is one minibatch gradient evaluation. The optimiser keeps
``closure_calls`` (all calls so far, persisted in ``state_dict``) and
``last_step_closure_calls``; the engine multiplies by the minibatch size to count single-image
gradient evaluations as in the paper. ``gradient_evaluations_per_image`` is an alias of
``closure_calls`` (evaluations per image of the minibatch). When a first-order optimiser is
stepped without a closure (``.grad`` already computed by the caller), that gradient counts as
one call.

State. Everything lives in ``self.state`` / ``self.param_groups`` so that ``state_dict()`` /
``load_state_dict()`` restore the exact trajectory. Scalars shared by all parameters (iteration
number, counters, damping, ...) live, as in torch.optim.LBFGS, in the state of the first
parameter; they are Python numbers or lists of Python numbers (never strings: torch's
``load_state_dict`` would mangle them).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from cryostoch.optim import _vectors as vec
from cryostoch.optim.calibration import CurvatureEstimate, estimate_curvature_scale
from cryostoch.optim.schedules import ANNEAL_POWER, annealed_lr

Closure = Callable[[], Tensor]

# With L an upper bound of the curvature (supply_curvature_scale), the fixed gradient step with
# the fastest worst-case contraction over a spectrum in [mu, L] is 2 / (L + mu), about 2 / L
# since the least measured frequencies have mu ~ 0: the rates c / L become 2 c / L. (A finite
# difference along the gradient is not a bound, so measured rates keep the factor 1.) Measured
# with paper-faithful SGD (issue 13, box 64 at 5.6 A/px): steps 0.38, 0.48, 0.76, 1.0 reached
# FSC 0.5 at 0.77, 0.76, 0.96 and 1.03 of the cutoff in 147 steps; 2 / largest eigenvalue: 0.97.
BOUND_GAIN = 2.0


# --------------------------------------------------------------------------- validation
def check_lr(lr: float | None, name: str = "lr") -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (or None to calibrate), got {lr!r}")
    return float(lr)


def check_nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(value: float, name: str, *, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value \
        and (value <= 1.0 if closed_right else value < 1.0)
    if not ok:
        right = "]" if closed_right else ")"
        raise ValueError(f"{name} must lie in [0, 1{right}, got {value!r}")
    return float(value)


def check_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_fd_rel(value: float | None) -> float | None:
    return None if value is None else check_positive(value, "fd_rel")


def anneal_defaults(anneal: float, anneal_power: float) -> dict[str, float]:
    return {"anneal": check_nonneg(anneal, "anneal"),
            "anneal_power": check_nonneg(anneal_power, "anneal_power")}


# --------------------------------------------------------------------------- base class
class CountingOptimizer(torch.optim.Optimizer):
    """Base class: closure counting, iteration number, learning-rate calibration.

    Subclasses set ``lr_constant`` (c_method in ``base_lr = c_method / L``) or override
    :meth:`_default_lr`, and ``single_group = True`` when they act on the concatenation of
    all parameters (TONGA, online L-BFGS, Hessian-free), which supports one parameter group.
    """

    lr_constant: float = 1.0
    single_group: bool = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 defaults: dict[str, Any]):
        super().__init__(params, defaults)
        if self.single_group and len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} does not support per-parameter options "
                             "(pass a single parameter group)")
        for group in self.param_groups:
            check_lr(group["lr"])
            for p in group["params"]:
                if not (p.is_floating_point()):
                    raise ValueError(f"{type(self).__name__} needs real floating-point "
                                     f"parameters, got dtype {p.dtype}")
        self._step_calls = 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but on a deep copy: the loaded state never aliases ``state_dict``'s
        tensors (torch.optim would share them when device and dtype already match, so that
        stepping one optimiser would change the other's state in place)."""
        super().load_state_dict(copy.deepcopy(state_dict))

    # ----------------------------------------------------------------- parameters / state
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def _global(self) -> dict[str, Any]:
        return self.state[self._params()[0]]

    @property
    def iteration(self) -> int:
        """Number of completed steps (the t of the next step's schedules)."""
        return int(self._global.get("iteration", 0))

    @property
    def closure_calls(self) -> int:
        """Minibatch gradient evaluations (closure calls) so far, calibration included."""
        return int(self._global.get("closure_calls", 0))

    @property
    def gradient_evaluations_per_image(self) -> int:
        """Alias of :attr:`closure_calls` (multiply by the minibatch size for images)."""
        return self.closure_calls

    @property
    def last_step_closure_calls(self) -> int:
        """Closure calls made by the last completed step."""
        return int(self._global.get("last_step_closure_calls", 0))

    def closure_calls_last_step(self) -> int:
        return self.last_step_closure_calls

    @property
    def calibrated_curvature(self) -> float | None:
        """The curvature scale L measured for ``lr=None`` (None if not measured)."""
        return self._global.get("curvature_scale")

    def current_lrs(self) -> list[float | None]:
        """The learning rate each group would use at the next step (after annealing)."""
        t = self.iteration
        return [None if g["lr"] is None else self._lr_t(g, t) for g in self.param_groups]

    @staticmethod
    def _lr_t(group: dict[str, Any], t: int) -> float:
        return annealed_lr(group["lr"], t, group.get("anneal", 0.0),
                           group.get("anneal_power", ANNEAL_POWER))

    # ----------------------------------------------------------------- step scaffolding
    def _begin(self, closure: Closure | None) -> Closure | None:
        self._step_calls = 0
        if closure is None:
            return None

        def counted() -> Tensor:
            self._step_calls += 1
            with torch.enable_grad():
                return closure()

        return counted

    def _end(self) -> None:
        glob = self._global
        glob["iteration"] = int(glob.get("iteration", 0)) + 1
        glob["closure_calls"] = int(glob.get("closure_calls", 0)) + self._step_calls
        glob["last_step_closure_calls"] = self._step_calls

    def _evaluate(self, counted: Closure | None) -> Tensor | None:
        """Gradient at the current point: call the closure, or accept the caller's ``.grad``."""
        if counted is not None:
            return counted()
        if all(p.grad is None for p in self._params()):
            raise RuntimeError(f"{type(self).__name__}.step() without a closure needs .grad "
                               "to be computed first")
        self._step_calls += 1
        return None

    @staticmethod
    def _require_closure(counted: Closure | None, why: str) -> Closure:
        if counted is None:
            raise ValueError(f"this optimiser needs a closure: {why}")
        return counted

    # ----------------------------------------------------------------- calibration
    def _measure_curvature(self, counted: Closure | None) -> CurvatureEstimate:
        """One extra closure call at the current point, gradients taken from ``.grad``; none
        when a scale was supplied by :meth:`supply_curvature_scale`."""
        params = self._params()
        supplied = self._global.pop("supplied_curvature_scale", None)
        if supplied is not None:
            grads = vec.current_grads(params)
            gnorm = vec.norm(grads)
            est = CurvatureEstimate(scale=float(supplied), rayleigh=float("nan"),
                                    closure_calls=0, grad_norm=gnorm,
                                    grad_rms=gnorm / math.sqrt(max(vec.numel(params), 1)))
        else:
            counted = self._require_closure(counted, "lr=None calibrates the learning rate "
                                                     "from the curvature (or pass lr explicitly)")
            est = estimate_curvature_scale(counted, params, vec.current_grads(params),
                                           fd_rel=self.param_groups[0].get("fd_rel"))
        if not (math.isfinite(est.scale) and est.scale > 0.0):
            raise RuntimeError(f"{type(self).__name__}: the measured curvature scale is "
                               f"{est.scale}; cannot choose a learning rate (pass lr)")
        self._global["curvature_scale"] = est.scale
        self._global["curvature_is_bound"] = supplied is not None
        if math.isfinite(est.rayleigh):  # NaN when supplied (not measured)
            self._global["curvature_rayleigh"] = est.rayleigh
        return est

    def _default_lr(self, group: dict[str, Any], curvature: Callable[[], CurvatureEstimate]
                    ) -> float:
        """base_lr = lr_constant / L, times BOUND_GAIN when L is a supplied upper bound of
        the curvature (subclasses override)."""
        scale = curvature().scale
        gain = BOUND_GAIN if self._global.get("curvature_is_bound") else 1.0
        return gain * self._lr_constant(group) / scale

    def _lr_constant(self, group: dict[str, Any]) -> float:
        return self.lr_constant

    def supply_curvature_scale(self, scale: float) -> None:
        """Use ``scale`` as L at the next calibration instead of measuring it.

        ``scale`` must bound the positive curvature from above (the engine's largest
        Gauss-Newton eigenvalue): the rates c / L then gain BOUND_GAIN. For a caller that
        knows the curvature that limits a stable step better than a finite difference along
        the gradient can (which also picks up the negative curvature of the marginal over
        poses, and lies below the largest eigenvalue).
        """
        self._global["supplied_curvature_scale"] = check_positive(scale, "curvature scale")

    def recalibrate(self) -> None:
        """Measure the learning rate again at the next step (one extra gradient evaluation).

        For a change of objective (a new cutoff or posterior temperature has another
        curvature). A rate the user fixed should not be recalibrated: the caller decides.
        """
        for group in self.param_groups:
            group["lr"] = None

    def _ensure_lr(self, counted: Closure | None) -> None:
        """Resolve ``lr=None`` groups; the curvature is measured at most once."""
        if all(g["lr"] is not None for g in self.param_groups):
            return
        cache: list[CurvatureEstimate] = []

        def curvature() -> CurvatureEstimate:
            if not cache:
                cache.append(self._measure_curvature(counted))
            return cache[0]

        for group in self.param_groups:
            if group["lr"] is None:
                group["lr"] = float(self._default_lr(group, curvature))


def param_rms(params: Iterable[Tensor]) -> float:
    params = list(params)
    n = max(vec.numel(params), 1)
    return vec.norm(params) / math.sqrt(n)
