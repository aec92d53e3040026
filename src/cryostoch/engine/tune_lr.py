"""The paper's step-size protocol, automated (`cryostoch tune-lr`).

The paper tuned each method's base learning rate by hand on a subset of the training data
(section 4). Here: prepare the particles once, draw a seeded subset of the training images,
measure the method's calibrated base rate (and, for AdaGrad, TONGA, online L-BFGS and
Hessian-free, its damping) with one calibrating step, then run one short reconstruction per
point of a grid of multiples of them, each for the same budget of single-image gradient
evaluations from the same random start, and choose the point with the lowest held-out NLL
(the test images no run trains on, the same as a `reconstruct` run with this seed holds
out). Every run uses a fixed rate (no recalibration at stage changes), as `reconstruct --lr`
does with the chosen value.

With `extend_edges` > 0, a choice at the grid's largest or smallest multiple (the best rate may
lie beyond it) adds the next multiple past that edge, at the grid's own ratio there (x 2 on a
grid of powers of 2), with every damping, and chooses again: up to `extend_edges` times, or
until the choice lies inside the grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.prepare import PreparedRun, prepare_run
from cryostoch.engine.reconstruct import Reconstruction
from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path
from cryostoch.optim.hessian_free import DAMPING_REL

log = logging.getLogger(__name__)

TUNE_FILE = "tune_lr.json"
DEFAULT_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# the methods with a damping to tune beside the rate: AdaGrad's delta (relative to the first
# gradient's RMS; its default 0 is the plain method, so the grid is of multiples of 1),
# TONGA's regulariser (relative to the top covariance eigenvalue), online L-BFGS's model-trust
# lambda (which bounds its inverse Hessian's gain along flat, noisy directions) and
# Hessian-free's initial Levenberg-Marquardt damping
DAMPED_METHODS = ("adagrad", "tonga", "olbfgs", "hf")
ADAGRAD_DAMPING_UNIT = 1.0
DEFAULT_DAMPING_MULTIPLES = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class TuneConfig:
    """base: the reconstruction to tune (its out_dir is the tuning folder; lr must be unset);
    multiples: of the calibrated base rate; damping_multiples: of the default damping (adagrad,
    TONGA, olbfgs, hf; None: DEFAULT_DAMPING_MULTIPLES for them, none for the others);
    subset_images: training images the short runs draw from; budget: gradient evaluations per
    run (None: two passes over the subset); extend_edges: how many times a choice at an edge of
    the grid of multiples extends it past that edge (0: never)."""

    base: ReconstructionConfig
    multiples: tuple[float, ...] = DEFAULT_MULTIPLES
    damping_multiples: tuple[float, ...] | None = None
    subset_images: int = 1000
    budget: int | None = None
    extend_edges: int = 0

    def __post_init__(self) -> None:
        def positive(values: tuple[float, ...], option: str) -> None:
            if not values or any(not (math.isfinite(v) and v > 0) for v in values):
                raise InputError(option, f"give positive numbers, got {list(values)}")
        positive(self.multiples, "--multiples")
        if self.damping_multiples is not None:
            positive(self.damping_multiples, "--damping-multiples")
            if self.base.optimizer not in DAMPED_METHODS:
                raise InputError("--damping-multiples", "only adagrad, tonga, olbfgs and hf have a "
                                 f"damping to tune, not {self.base.optimizer}")
        if self.base.lr is not None:
            raise InputError("--lr", "tune-lr measures the rate; leave --lr out")
        if self.subset_images < self.base.effective_batch_size:
            raise InputError("--subset", f"{self.subset_images} images are fewer than one "
                             f"minibatch ({self.base.effective_batch_size})")
        if self.budget is not None and self.budget < 1:
            raise InputError("--budget", f"must be a positive number of gradient "
                             f"evaluations, got {self.budget}")
        if self.extend_edges < 0:
            raise InputError("--extend-edges", f"must be >= 0, got {self.extend_edges}")
        if self.base.test_size < 1:
            raise InputError("--test-size", "tune-lr chooses by the held-out NLL: hold out "
                             "at least one image")

    @property
    def tuned_dampings(self) -> tuple[float, ...] | None:
        if self.base.optimizer not in DAMPED_METHODS:
            return None
        return self.damping_multiples or DEFAULT_DAMPING_MULTIPLES


def training_subset(prepared: PreparedRun, n_images: int, seed: int) -> PreparedRun:
    """`prepared` with its training set cut to a seeded random `n_images` (the held-out set
    is kept, so the NLLs stay those of images no run trains on)."""
    if n_images >= prepared.n_train:
        return prepared
    g = torch.Generator().manual_seed(seed + 104_729)
    keep = np.sort(torch.randperm(prepared.n_train, generator=g)[:n_images].numpy())
    return dataclasses.replace(prepared, train=prepared.train.subset(keep),
                               train_rows=prepared.train_rows[keep])


def calibrated_values(config: ReconstructionConfig, prepared: PreparedRun
                      ) -> tuple[float, float | None, int]:
    """(base rate, base damping or None, gradient evaluations spent): one calibrating step."""
    run = Reconstruction(dataclasses.replace(config, gradient_budget=1), progress=False,
                         prepared=prepared)
    run.optimise()
    optimizer = run.optimizer
    rate = float(optimizer.param_groups[0]["lr"])
    damping = None
    if config.optimizer == "adagrad":
        damping = ADAGRAD_DAMPING_UNIT
    elif config.optimizer == "tonga":
        damping = float(optimizer.param_groups[0]["damping"])
    elif config.optimizer == "olbfgs":
        damping = float(optimizer.model_trust)
    elif config.optimizer == "hf":
        damping = DAMPING_REL * float(optimizer.calibrated_curvature)
    return rate, damping, run.state.gradient_evaluations


def grid_points(tune: TuneConfig, rate: float, damping: float | None,
                multiples: tuple[float, ...] | None = None) -> list[dict]:
    """One dict per run: lr_multiple, lr and (damped methods) damping_multiple, damping; for
    `multiples` (default: the grid's) with every damping."""
    dampings = tune.tuned_dampings
    points = []
    for m in tune.multiples if multiples is None else multiples:
        for d in dampings or (None,):
            point = {"lr_multiple": m, "lr": m * rate}
            if d is not None:
                point |= {"damping_multiple": d, "damping": d * damping}
            points.append(point)
    return points


def chosen_index(nlls: list[float]) -> int:
    """The grid point with the lowest finite held-out NLL (the first of equals)."""
    finite = [i for i, v in enumerate(nlls) if math.isfinite(v)]
    if not finite:
        raise InputError("--multiples", "every run of the grid diverged: try smaller multiples")
    return min(finite, key=lambda i: nlls[i])


def beyond_edge(multiples: list[float], chosen: float) -> float | None:
    """The next multiple past the grid's edge when `chosen` lies at it (the grid's own ratio
    between its two outermost multiples on that side), else None (inside, or one multiple)."""
    grid = sorted(set(multiples))
    if len(grid) < 2:
        return None
    if chosen == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    if chosen == grid[0]:
        return grid[0] * grid[0] / grid[1]
    return None


def _run_point(base: ReconstructionConfig, point: dict, budget: int,
               prepared: PreparedRun) -> int:
    """One short run at `point`'s rate (and damping); records its held-out NLL (None when it
    diverged) and gradient evaluations in `point`; returns the latter."""
    options = dict(base.optimizer_options)
    if "damping" in point:
        options["damping"] = point["damping"]
    config = dataclasses.replace(base, lr=point["lr"], optimizer_options=options,
                                 gradient_budget=budget, epochs=budget / prepared.n_train)
    run = Reconstruction(config, progress=False, prepared=prepared)
    nll = run.optimise()
    point["test_nll"] = nll if math.isfinite(nll) else None
    point["gradient_evaluations"] = run.state.gradient_evaluations
    log.info("lr x %g%s: held-out NLL %s", point["lr_multiple"],
             f", damping x {point['damping_multiple']:g}" if "damping" in point else "",
             "diverged" if point["test_nll"] is None else f"{nll:.3f}")
    return run.state.gradient_evaluations


def _best(points: list[dict]) -> dict:
    return points[chosen_index([math.inf if p["test_nll"] is None else p["test_nll"]
                                for p in points])]


def tune_learning_rate(tune: TuneConfig, *, progress: bool = True) -> dict:
    """Run the grid; write and return the record (see the module docstring and README)."""
    start = time.perf_counter()
    base, out = tune.base, tune.base.out_path
    out.mkdir(parents=True, exist_ok=True)
    prepared = training_subset(prepare_run(base, progress=progress), tune.subset_images,
                               base.seed)
    n_train = prepared.n_train
    budget = tune.budget or 2 * n_train
    rate, damping, spent = calibrated_values(base, prepared)
    log.info("calibrated base rate %.4g%s (%d gradient evaluations)", rate,
             "" if damping is None else f", damping {damping:.4g}", spent)
    points = grid_points(tune, rate, damping)
    spent += sum(_run_point(base, point, budget, prepared) for point in points)
    multiples, extended = list(tune.multiples), []
    chosen = _best(points)
    while len(extended) < tune.extend_edges:
        past = beyond_edge(multiples, chosen["lr_multiple"])
        if past is None:
            break
        log.info("the chosen rate is at the edge of the grid (x %g): trying x %g",
                 chosen["lr_multiple"], past)
        new = grid_points(tune, rate, damping, (past,))
        spent += sum(_run_point(base, point, budget, prepared) for point in new)
        points += new
        multiples.append(past)
        extended.append(past)
        chosen = _best(points)
    at_edge = beyond_edge(multiples, chosen["lr_multiple"]) is not None
    if at_edge:  # the best rate may lie outside the grid
        log.warning("the chosen rate is at the edge of the grid (x %g): widen --multiples",
                    chosen["lr_multiple"])
    record = {
        "optimizer": base.optimizer,
        "lr": chosen["lr"],
        "optimizer_options": {"damping": chosen["damping"]} if "damping" in chosen else {},
        "chosen": chosen,
        "at_grid_edge": at_edge,
        "grid_multiples": list(tune.multiples),
        "extend_edges": tune.extend_edges,
        "extended_multiples": extended,
        "base_lr": rate,
        "base_damping": damping,
        "grid": points,
        "budget_per_run": budget,
        "subset_images": n_train,
        "test_images": len(prepared.test_rows),
        "gradient_evaluations_total": spent,
        "seconds": round(time.perf_counter() - start, 1),
        "settings": base.to_dict(),
    }
    with atomic_path(out / TUNE_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return record


def read_tuned(path: str | Path) -> tuple[str, float, dict]:
    """(optimizer, lr, optimizer options) from a tune_lr.json (InputError if unusable)."""
    try:
        record = json.loads(Path(path).read_text())
        lr, options = float(record["lr"]), dict(record.get("optimizer_options", {}))
        name = str(record["optimizer"])
    except OSError as err:
        raise InputError(path, f"cannot be read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(path, "is not a tune_lr.json written by cryostoch tune-lr") from None
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(path, f"holds no usable learning rate ({lr})")
    return name, lr, options
