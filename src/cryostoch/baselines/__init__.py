"""The paper's baselines (Fig. 6): iterative projection matching and batch EM (RELION-style).

Both update the map in closed form from back-projection sums (`reconstruct_map`); the engine
that runs them on a particle set is `cryostoch.engine.baseline`.
"""

from cryostoch.baselines.batch_em import batch_em, em_iteration
from cryostoch.baselines.iteration import IterationResult
from cryostoch.baselines.projection_matching import (
    projection_matching,
    projection_matching_iteration,
)
from cryostoch.baselines.reconstruct_map import (
    BackProjection,
    Regulariser,
    backproject_sums,
    closed_form_map,
    refine_map,
    shell_power,
    solve_map,
)

METHODS = ("projmatch", "em")

__all__ = [
    "METHODS",
    "BackProjection",
    "IterationResult",
    "Regulariser",
    "backproject_sums",
    "batch_em",
    "closed_form_map",
    "em_iteration",
    "projection_matching",
    "projection_matching_iteration",
    "refine_map",
    "shell_power",
    "solve_map",
]
