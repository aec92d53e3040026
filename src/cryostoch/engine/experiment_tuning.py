"""The paper's step-size protocol inside the study: each built-in method's base learning rate
(and AdaGrad's delta, TONGA's regulariser, online L-BFGS's lambda, HF's damping) tuned on a
subset of the training images before its run, with `tune-lr`'s grid (engine/tune_lr.py), and
the chosen values handed to the run.

Why: the paper tuned every base rate by hand "by examining performance on a subset of the
training examples"; the curvature calibration alone is a stability bound, not the best step
for a method. Measured on the 1/10-scale synthetic set (box 128, 4,900 training images, 10
epochs): calibrated momentum (eta_0 = (1 - mu_max) 2 / L, so that its steady-state step is
SGD's) spends most of its 490 steps with mu < 0.9 at a fifth to four fifths of SGD's
effective step and ends at FSC 0.5 of 87 A for a 56 A cutoff; the grid on 1,000 images
(20 steps each) chose 8x that rate, which over the whole run reached 51 A (README, "The
paper's study at 1/10 scale").

External optimisers (given by import path) and `cryostoch` keep their calibrated rates: the
former are documented to run as calibrated SGD does, the latter is this package's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from cryostoch.engine.config import OPTIMIZER_NAMES, ReconstructionConfig
from cryostoch.engine.experiment_runs import Plan, read_json, settings_json
from cryostoch.engine.schedule import run_epochs
from cryostoch.engine.tune_lr import TUNE_FILE, TuneConfig, tune_learning_rate

log = logging.getLogger(__name__)

# Factors of 2 either side of the calibrated rate: momentum's calibrated rate is (1 - mu_max)
# = 0.1 of SGD's, so its best multiple lies near 10 (8 chosen at 1/10 scale), beyond
# tune-lr's default 0.25-4
STUDY_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# A choice at the grid's edge (online L-BFGS's 16 at 1/10 scale) tries x 2 past it, up to
# twice, so that the reported choice is the grid's best inside it, not a bound of the grid
STUDY_EXTEND_EDGES = 2
# Each grid point's budget: a fixed share of a method run's gradient evaluations, so that the
# tuning sees the same fraction of the run at larger --scale (at full size 19,960 of 499,000;
# a fixed count would shrink the tuning's horizon 10x against the run's from 1/10 scale to
# full size), and at least STUDY_MIN_BUDGET (20 steps of a minibatch of 100), so that small
# scales still rank the rates after more than a few steps (at 1/10 scale 2,000 of 49,000).
STUDY_RUN_FRACTION = 0.04
STUDY_MIN_BUDGET = 2000


@dataclass(frozen=True)
class StudyTuning:
    """subset_images: training images the short runs draw from (all when fewer);
    budget: single-image gradient evaluations per grid point (None: run_fraction of the
    method run's, at least STUDY_MIN_BUDGET); extend_edges: how many times a choice at an
    edge of the grid extends it past that edge (x 2 each)."""

    subset_images: int = 1000
    budget: int | None = None
    run_fraction: float = STUDY_RUN_FRACTION
    multiples: tuple[float, ...] = STUDY_MULTIPLES
    extend_edges: int = STUDY_EXTEND_EDGES

    def __post_init__(self) -> None:
        if self.subset_images < 300:  # HF's minibatch
            raise ValueError("tune-subset must be >= 300 (HF's minibatch)")
        if self.budget is not None and self.budget < 1:
            raise ValueError("tune-budget must be a positive number of gradient evaluations")
        if not 0 < self.run_fraction <= 1:
            raise ValueError("the tuning's run fraction must be in (0, 1]")
        if self.extend_edges < 0:
            raise ValueError("extend-edges must be >= 0")


    def point_budget(self, config: ReconstructionConfig, n_train: int) -> int:
        """Gradient evaluations per grid point for the run `config` on `n_train` images."""
        if self.budget is not None:
            return self.budget
        run = config.gradient_budget or run_epochs(config, n_train) * n_train
        return max(STUDY_MIN_BUDGET, round(self.run_fraction * run))


def _saved_dampings(saved: dict) -> list[float]:
    """The damping multiples a saved grid tried (none for an undamped method, or one tuned
    before its damping was)."""
    return sorted({p["damping_multiple"] for p in saved.get("grid", [])
                   if p.get("damping_multiple") is not None})


def _tuned_record(tuning: StudyTuning, config: ReconstructionConfig, folder: Path,
                  n_train: int, *, progress: bool, resume: bool) -> dict:
    """The tune_lr.json record for one method: reused on `resume` when it was written with
    the same run settings, else made now."""
    saved = read_json(folder / TUNE_FILE) if resume else None
    tune_base = dataclasses.replace(config, out_dir=str(folder))
    budget = tuning.point_budget(config, n_train)
    tune = TuneConfig(tune_base, multiples=tuning.multiples,
                      subset_images=min(tuning.subset_images, n_train), budget=budget,
                      extend_edges=tuning.extend_edges)
    if saved is not None and saved.get("settings") == settings_json(tune_base.to_dict()) \
            and saved.get("budget_per_run") == budget \
            and saved.get("grid_multiples") == list(tuning.multiples) \
            and saved.get("extend_edges") == tuning.extend_edges \
            and _saved_dampings(saved) == sorted(tune.tuned_dampings or ()):
        log.info("%s: tuned rate reused from %s", config.optimizer, folder / TUNE_FILE)
        return saved
    return tune_learning_rate(tune, progress=progress)


def tuned_plan(plan: Plan, tuning: StudyTuning, out: Path, n_train: int, *,
               progress: bool, resume: bool) -> tuple[Plan, list[dict]]:
    """`plan` with every built-in method's lr (and damping) set by the grid, and one row per
    tuned method for the report (its folder: out/tune/METHOD)."""
    tuned: Plan = []
    rows = []
    for name, config in plan:
        if not (isinstance(config, ReconstructionConfig) and name in OPTIMIZER_NAMES):
            tuned.append((name, config))
            continue
        if min(tuning.subset_images, n_train) < config.effective_batch_size:
            # too few training images for one of its minibatches (HF's 300 on a small real
            # subset): the calibrated rate, said in the report, rather than no study
            log.warning("%s: %s keeps its calibrated rate: %d training images are fewer "
                        "than one minibatch (%d)", out.name, name, n_train,
                        config.effective_batch_size)
            tuned.append((name, config))
            rows.append({"method": name, "not_tuned": f"{n_train} training images, fewer "
                         f"than one minibatch ({config.effective_batch_size})"})
            continue
        log.info("%s: tuning %s's step size", out.name, name)
        record = _tuned_record(tuning, config, out / "tune" / name, n_train,
                               progress=progress, resume=resume)
        options = dict(config.optimizer_options) | record["optimizer_options"]
        tuned.append((name, dataclasses.replace(config, lr=record["lr"],
                                                optimizer_options=options)))
        chosen = record["chosen"]
        rows.append({"method": name, "calibrated_lr": record["base_lr"],
                     "lr_multiple": chosen["lr_multiple"], "lr": record["lr"],
                     "damping_multiple": chosen.get("damping_multiple"),
                     "damping": chosen.get("damping"), "at_grid_edge": record["at_grid_edge"],
                     "extended": record.get("extended_multiples", []),
                     "budget_per_point": record.get("budget_per_run"),
                     "gradient_evaluations": record["gradient_evaluations_total"],
                     "seconds": record["seconds"]})
    return tuned, rows


def tuning_markdown(rows: list[dict], tuning: StudyTuning) -> list[str]:
    """The report's lines on the tuned step sizes."""
    if not rows:
        return []
    budgets = sorted({r["budget_per_point"] for r in rows if r.get("budget_per_point")})
    each = (f"{tuning.budget}" if tuning.budget is not None else
            f"{tuning.run_fraction:.0%} of a method run's, at least {STUDY_MIN_BUDGET} "
            f"({', '.join(str(b) for b in budgets)})")
    lines = [f"Step sizes tuned (the paper's protocol): for each method a grid of "
             f"{', '.join(f'{m:g}' for m in tuning.multiples)} x the calibrated rate (AdaGrad, "
             f"TONGA, online L-BFGS, HF: x 0.1, 1, 10 the default damping too; a choice at the "
             f"grid's edge tries x 2 past it, up to {tuning.extend_edges} times), each point "
             f"{each} gradient evaluations on {tuning.subset_images} training images (at "
             "most), the lowest held-out NLL chosen. In all "
             f"{sum(r.get('gradient_evaluations', 0) for r in rows)} gradient evaluations, "
             f"{sum(r.get('seconds', 0.0) for r in rows) / 60:.1f} min.", "",
             "| method | calibrated lr | multiple | lr | damping | multiples added past an "
             "edge | at grid edge |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_tuned" in r:
            lines.append(f"| {r['method']} | calibrated, not tuned: {r['not_tuned']} "
                         "| | | | | |")
            continue
        damping = ("" if r["damping"] is None
                   else f"{r['damping']:.3g} (x {r['damping_multiple']:g})")
        lines.append(f"| {r['method']} | {r['calibrated_lr']:.4g} | {r['lr_multiple']:g} | "
                     f"{r['lr']:.4g} | {damping} | "
                     f"{', '.join(f'{m:g}' for m in r.get('extended', []))} | "
                     f"{'yes' if r['at_grid_edge'] else ''} |")
    return lines + [""]


__all__ = ["STUDY_MULTIPLES", "StudyTuning", "tuned_plan", "tuning_markdown"]
