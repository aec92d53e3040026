"""The method runs of the paper's study: the plan (the paper's optimisers, any external
`torch.optim.Optimizer` given by import path, this package's defaults and the two baselines,
all from the same start and image order), running them, and the records that let `--resume`
reuse the runs that finished.

Every method gets the same `ReconstructionConfig` but for its optimiser and folder. An external
optimiser (``package.module:Class``) runs exactly as a built-in first-order method does: the
paper's plain updates, minibatch 100 (SGD's; `DEFAULT_BATCH_SIZE` names only built-in methods),
its learning rate 2 / L from the measured curvature bound (optim/external.py), its closure calls
counted as gradient evaluations against the same budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cryostoch.engine.baseline import BaselineConfig, BaselineRun
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.reconstruct import Reconstruction
from cryostoch.engine.run_folder import CHECKPOINT_NAME
from cryostoch.errors import DivergedError
from cryostoch.io._common import atomic_path
from cryostoch.io.mrc import read_map
from cryostoch.optim.external import is_import_path

log = logging.getLogger(__name__)

RUN_RECORD = "experiment_run.json"
HALVINGS_FILE = "lr_halvings.json"
# the planned settings of a started run: a resumed study continues its checkpoint (and its
# halvings) only when they are still the plan's (a re-tuned rate starts the run afresh)
STARTED_FILE = "experiment_started.json"
MAX_LR_HALVINGS = 3
BASELINES = ("projmatch", "em")


@dataclass
class MethodRun:
    name: str
    out_dir: Path
    metrics: list[dict]
    volume: torch.Tensor
    seconds: float
    gradient_evaluations: int
    final_test_nll: float | None
    lr_halvings: int = 0  # times the run diverged and was run again at half its step


def method_name(optimizer: str) -> str:
    """The study's name (table row, folder, legend) of an optimiser: a built-in name as it is,
    an import path with its colon as a dot (``mypkg.mod:MyOpt`` -> ``mypkg.mod.MyOpt``), so
    that it never collides with a built-in name such as `adam` (``torch.optim.Adam``)."""
    return optimizer.replace(":", ".") if is_import_path(optimizer) else optimizer


def external_optimizers(optimizers: Sequence[str]) -> list[str]:
    """The import paths among `optimizers`."""
    return [o for o in optimizers if is_import_path(o)]


def settings_json(value: dict) -> dict:
    """A JSON round trip, so that saved and current settings compare equal (tuples: lists)."""
    return json.loads(json.dumps(value, default=str))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None where it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _finished_run(name: str, out_dir: Path, settings: dict) -> MethodRun | None:
    """The recorded result of a method run that finished with these settings, else None."""
    saved = read_json(out_dir / RUN_RECORD)
    if saved is None or saved.get("settings") != settings or not (out_dir / "map.mrc").exists():
        return None
    volume, _ = read_map(out_dir / "map.mrc")
    return MethodRun(name, out_dir, saved["metrics"], volume, saved["seconds"],
                     saved["gradient_evaluations"], saved["final_test_nll"],
                     int(saved.get("lr_halvings", 0)))


def _record_run(run: MethodRun, settings: dict) -> None:
    """Written last, atomically: its presence means the run's outputs are complete.
    `settings` are the planned ones (what a resumed study matches); `lr_used` is the base
    rate the run had after its halvings (None where the rate was calibrated in the run)."""
    planned_lr = settings.get("lr")
    record = {"settings": settings, "metrics": run.metrics, "seconds": run.seconds,
              "gradient_evaluations": run.gradient_evaluations,
              "final_test_nll": run.final_test_nll, "lr_halvings": run.lr_halvings,
              "lr_used": None if planned_lr is None else planned_lr / 2**run.lr_halvings}
    with atomic_path(run.out_dir / RUN_RECORD) as tmp:
        tmp.write_text(json.dumps(record, default=str))


Plan = list[tuple[str, ReconstructionConfig | BaselineConfig]]  # (method name, its config)


def method_plan(base: ReconstructionConfig, out: Path, optimizers: Sequence[str],
                baseline_iterations: int) -> Plan:
    """(name, config) of every run: each optimiser (built-in or import path) paper-faithful,
    `cryostoch` (SGD with this package's defaults), then the baselines."""
    plan: Plan = [
        (method_name(o), dataclasses.replace(base, optimizer=o,
                                             out_dir=str(out / method_name(o))).paper_faithful())
        for o in optimizers]
    plan.append(("cryostoch", dataclasses.replace(base, optimizer="sgd",
                                                  out_dir=str(out / "cryostoch"))))
    # the paper-faithful settings give the baselines exactly the paper runs' start
    baseline_base = dataclasses.replace(base.paper_faithful(), snapshots=(),
                                        gradient_budget=None)
    plan += [(method, BaselineConfig(method=method, iterations=baseline_iterations,
                                     reconstruction=dataclasses.replace(
                                         baseline_base, out_dir=str(out / method))))
             for method in BASELINES]
    return plan


def run_methods(plan: Plan, out: Path, *,
                progress: bool, resume: bool) -> list[MethodRun]:
    """Run the plan in order (on `resume`, reusing each run that finished with the same
    settings) and return every run's result."""
    runs: list[MethodRun] = []
    for name, cfg in plan:
        run_dir = out / name
        is_baseline = isinstance(cfg, BaselineConfig)
        settings = settings_json({"baseline": cfg.to_dict(),
                                  "reconstruction": cfg.reconstruction.to_dict()}
                                 if is_baseline else cfg.to_dict())
        done = _finished_run(name, run_dir, settings) if resume else None
        if done is not None:
            log.info("%s: %s finished earlier (%s): reused", out.name, name, run_dir / RUN_RECORD)
            runs.append(done)
            continue
        log.info("%s: %s", out.name, name)
        start = time.perf_counter()
        started = _started_with(run_dir, settings)  # always: marks a fresh start too
        result, earlier, halvings = _run_halving_on_divergence(
            name, cfg, run_dir, progress=progress, resume=resume and started)
        # wall time, data preparation included, plus any time spent before a resume
        seconds = time.perf_counter() - start + earlier
        run = MethodRun(name, run_dir, result.metrics, result.volume, seconds,
                        result.gradient_evaluations, result.final_test_nll, halvings)
        _record_run(run, settings)
        runs.append(run)
    return runs


def _started_with(run_dir: Path, settings: dict) -> bool:
    """Whether the run in `run_dir` was started with `settings` (else it starts afresh); marks
    it so for the run about to start."""
    saved = read_json(run_dir / STARTED_FILE)
    same = saved is not None and saved.get("settings") == settings
    if not same:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / HALVINGS_FILE).unlink(missing_ok=True)
        with atomic_path(run_dir / STARTED_FILE) as tmp:
            tmp.write_text(json.dumps({"settings": settings}, default=str))
    return same


def _run_halving_on_divergence(name: str, cfg: ReconstructionConfig | BaselineConfig,
                               run_dir: Path, *, progress: bool, resume: bool):
    """(result, seconds before a resume, halvings) of one method run. A paper method whose
    step (tuned on a subset, for a short budget) diverges over the whole run is run again
    from the start at half the step, at most MAX_LR_HALVINGS times, rather than ending the
    study: the report says which. The halvings are kept in `HALVINGS_FILE` so that a resumed
    study continues the run at the step it had."""
    if isinstance(cfg, BaselineConfig):  # a study replaces its own runs; no checkpoint kept
        job = BaselineRun(cfg, overwrite=True, progress=progress)
        earlier = job.state.seconds
        return job.run(), earlier, 0
    halvings_path = run_dir / HALVINGS_FILE
    saved = read_json(halvings_path) if resume else None
    halvings = int(saved["halvings"]) if saved else 0
    # a study replaces its own runs: one stopped before its first checkpoint (interrupted, or
    # diverged by an older version that ended the study) starts again
    resume = resume and (run_dir / CHECKPOINT_NAME).exists()
    while True:
        attempt = dataclasses.replace(cfg, lr=cfg.lr / 2**halvings) if halvings else cfg
        job = Reconstruction(attempt, resume=resume, overwrite=not resume, progress=progress)
        earlier = job.state.seconds  # optimisation time before a resume (0 for a fresh run)
        try:
            return job.run(), earlier, halvings
        except DivergedError as err:
            if cfg.lr is None or halvings >= MAX_LR_HALVINGS:
                raise
            log.warning("%s: %s; running it again from the start at half the step",
                        name, err.problem)
            halvings += 1
            resume = False  # a fresh start at the smaller step
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(halvings_path) as tmp:
                tmp.write_text(json.dumps({"halvings": halvings}))


__all__ = ["BASELINES", "RUN_RECORD", "MethodRun", "external_optimizers", "method_name",
           "method_plan", "read_json", "run_methods", "settings_json"]
