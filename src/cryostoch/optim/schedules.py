"""Learning-rate and momentum schedules of the paper (section 4, "Optimization Methods").

Both take the iteration number ``t`` (0 for the first step) and return a Python float.
"""

from __future__ import annotations

import math

#: Exponent of the annealing schedule eta_t = eta_0 (1 + lambda t)^-0.75.
ANNEAL_POWER = 0.75
#: lambda of the annealing schedule used in the paper.
PAPER_ANNEAL = 1e-2
#: Upper limit of the momentum schedule (Sutskever et al. 2013, as used in the paper).
PAPER_MOMENTUM_MAX = 0.9


def _check_t(t: int) -> int:
    if isinstance(t, bool) or int(t) != t or t < 0:
        raise ValueError(f"iteration number t must be a non-negative integer, got {t!r}")
    return int(t)


def annealed_lr(eta0: float, t: int, decay: float = PAPER_ANNEAL,
                power: float = ANNEAL_POWER) -> float:
    """eta_t = eta0 * (1 + decay * t) ** -power (paper: decay = 1e-2, power = 0.75).

    ``decay = 0`` gives a constant learning rate.
    """
    t = _check_t(t)
    if decay < 0:
        raise ValueError(f"annealing decay must be >= 0, got {decay}")
    if power < 0:
        raise ValueError(f"annealing power must be >= 0, got {power}")
    if decay == 0:
        return float(eta0)
    return eta0 * (1.0 + decay * t) ** -power


def momentum_schedule(t: int, mu_max: float = PAPER_MOMENTUM_MAX) -> float:
    """mu_t = min(mu_max, 1 - 2^(-1 - log2(floor(t / 100) + 1))) (paper, after Sutskever 2013).

    Since 2^(-1 - log2 m) = 1 / (2 m) with m = floor(t / 100) + 1, this is evaluated as
    ``min(mu_max, 1 - 0.5 / m)``, which is exact in floating point where the printed form would
    round through log2: mu = 0.5 for t < 100, 0.75 for t < 200, 5/6 for t < 300, 0.875 for
    t < 400 and mu_max = 0.9 from t = 400 on.
    """
    t = _check_t(t)
    if not 0.0 <= mu_max < 1.0:
        raise ValueError(f"mu_max must lie in [0, 1), got {mu_max}")
    m = t // 100 + 1
    return min(mu_max, 1.0 - 0.5 / m)


def momentum_schedule_printed(t: int, mu_max: float = PAPER_MOMENTUM_MAX) -> float:
    """The momentum formula exactly as printed (through log2), for comparison in tests."""
    t = _check_t(t)
    return min(mu_max, 1.0 - 2.0 ** (-1.0 - math.log2(math.floor(t / 100) + 1)))
