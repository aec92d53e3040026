"""Baseline runs (paper Fig. 6): iterative projection matching or batch EM on a particle set.

`BaselineRun` starts from the same `PreparedRun` as a stochastic `Reconstruction`: the same data
preparation (working box, cutoff, normalisation, held-out test set), the same final-cutoff
likelihood model (which scores the held-out set, so curves are comparable with the stochastic
runs), the same random initial density for the same seed, and the same outputs (map.mrc,
metrics.csv, poses.star, report.png, report.html, config.json). Each iteration uses every
training image once and updates the map in closed form (`cryostoch.baselines`).

Accounting: one iteration reads each of the K training images once, so it is counted as K
gradient-evaluation equivalents and one epoch; the paper compares five baseline iterations with
five epochs (250,000 gradient evaluations for K = 50,000) of the stochastic methods. Metrics
rows: `minibatch_objective` is the mean training NLL of the iteration's E-step (batch EM: under
the map before the update; empty for projection matching, which evaluates no likelihood),
`learning_rate` is empty. No checkpoints are written (an iteration is one pass over the data).

Under torchrun each rank takes a contiguous share of the training images; the E-step sums
(back-projections, NLLs) are all-reduced before the M-step, so every rank solves the same map.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cryostoch.baselines import METHODS, Regulariser, em_iteration, projection_matching_iteration
from cryostoch.baselines.iteration import IterationResult
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import ONE_PROCESS, World, cleaned_up_by_main, joined
from cryostoch.engine.initial import initial_volume
from cryostoch.engine.noise_and_mask import NoiseAndMask
from cryostoch.engine.outputs import METRIC_FIELDS, ReconstructionResult, finish, run_info
from cryostoch.engine.prepare import prepare_run
from cryostoch.engine.progress import progress_bar
from cryostoch.engine.reconstruct import RunState
from cryostoch.engine.run_folder import open_run_folder
from cryostoch.engine.schedule import Schedule
from cryostoch.errors import InputError

log = logging.getLogger(__name__)

METHOD_LABELS = {"projmatch": "projection matching", "em": "batch EM"}

# ReconstructionConfig fields that mean nothing to a baseline; left out of config.json.
_UNUSED_FIELDS = (
    "optimizer", "epochs", "batch_size", "lr", "lambda_plus", "lambda_minus", "prior_beta",
    "snapshots", "test_every", "checkpoint_interval_s", "preconditioner", "start_freq_fraction",
    "marching_fraction", "marching_stages", "start_temperature", "optimizer_options",
)


@dataclass(frozen=True)
class BaselineConfig:
    """A baseline run: the method, its iterations and M-step settings, and the data settings.

    method: "projmatch" (iterative projection matching) or "em" (batch EM).
    reconstruction: data, cutoff, seed, init, device... as for `cryostoch reconstruct` (the
    optimiser fields are ignored).
    regulariser: the Wiener prior of the closed-form M-step (`Regulariser`).
    refine_iterations: conjugate-gradient steps of the exact M-step solve (0: gridded only).
    chunk_size: images per E-step chunk (bounds memory).
    """

    method: str
    reconstruction: ReconstructionConfig
    iterations: int = 5
    regulariser: Regulariser = field(default_factory=Regulariser)
    refine_iterations: int = 10
    chunk_size: int = 500

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.iterations < 1:
            problems.append("iterations must be >= 1")
        if self.refine_iterations < 0:
            problems.append("refine-iterations must be >= 0")
        if self.chunk_size < 1:
            problems.append("chunk size must be >= 1")
        if self.reconstruction.classes != 1:
            problems.append("the baselines reconstruct one class")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.method]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "iterations": self.iterations,
            "regulariser": dataclasses.asdict(self.regulariser),
            "regulariser_description": self.regulariser.describe(),
            "refine_iterations": self.refine_iterations,
            "chunk_size": self.chunk_size,
            "gradient_evaluations_per_iteration": "K (every training image once)",
        }


class BaselineRun:
    """A prepared baseline run; `run()` does `config.iterations` iterations and writes outputs."""

    def __init__(self, config: BaselineConfig, *, overwrite: bool = False,
                 progress: bool = True, world: World = ONE_PROCESS) -> None:
        self.baseline = config
        self.world = world
        self.progress = progress and world.is_main
        self.last_iteration: IterationResult | None = None
        # one iteration = one epoch, so the epoch bookkeeping (and the start's band limit,
        # from the schedule's first stage) read as for a stochastic run of that length
        self.config = dataclasses.replace(config.reconstruction, epochs=float(config.iterations))
        self.out = self.config.out_path
        world.on_main(lambda: open_run_folder(self.out, overwrite=overwrite))
        self.prepared = prepare_run(self.config, progress=self.progress, world=world)
        schedule = Schedule.from_config(self.config, self.prepared.geometry.cutoff_radius_px,
                                        self.prepared.n_train)
        # the same noise model and mask as a stochastic run, so the same start
        self.noise_and_mask = NoiseAndMask(self.prepared)
        self.noise_precision = self.noise_and_mask.precision(self.prepared.model)  # (G, M)
        self.volume = initial_volume(self.prepared, schedule.radius_px(0), self.noise_precision)
        self.noise_and_mask.apply_(self.volume)
        self.state = RunState()

    def run(self) -> ReconstructionResult:
        cfg, prepared = self.baseline, self.prepared
        model, train = prepared.model, prepared.train
        step = em_iteration if cfg.method == "em" else projection_matching_iteration
        state = self.state
        start_time = time.perf_counter()
        log.info("%s: %d iterations over %d training images (%d directions x %d angles x %d "
                 "shifts); M-step regulariser: %s", cfg.label, cfg.iterations, prepared.n_train,
                 model.n_directions, model.n_inplane, model.n_shifts, cfg.regulariser.describe())
        world = self.world
        bar = progress_bar(cfg.iterations * prepared.n_train, cfg.label, self.progress)
        self._log_metrics(None, self._test_nll(), start_time)
        rows = world.share(torch.arange(prepared.n_train))  # this rank's images
        options = {"sum_over_shares": world.sum_} if world.parallel else {}
        if prepared.symmetrize.group.order > 1:  # the M-step pools the sums over the group
            options["symmetrize"] = prepared.symmetrize
        if self.noise_precision is not None and cfg.method == "em":
            options["noise_precision"] = self.noise_precision[train.optics_index[rows]]
        share = train.subset(rows.numpy()) if world.parallel else train  # on disk: a view
        blocks, ctf = share.blocks, share.ctf
        for _ in range(cfg.iterations):
            result = step(model, self.volume, blocks, ctf,
                          regulariser=cfg.regulariser, chunk_size=cfg.chunk_size,
                          refine_iterations=cfg.refine_iterations,
                          progress=bar.update if bar else None, **options)
            if not bool(torch.isfinite(result.volume).all()):
                raise InputError(self.config.particles,
                                 f"the {cfg.label} map became non-finite at iteration "
                                 f"{state.iteration + 1}")
            self.volume = prepared.symmetrize(result.volume.detach())
            self.noise_and_mask.apply_(self.volume)
            self.last_iteration = dataclasses.replace(  # every rank's poses, on every rank
                result, pose_index=world.gathered_rows(prepared.n_train, result.pose_index),
                score=world.gathered_rows(prepared.n_train, result.score))
            state.iteration += 1
            state.images_seen += prepared.n_train
            state.gradient_evaluations += prepared.n_train
            test = self._test_nll()
            self._log_metrics(result.mean_nll, test, start_time)
            row = self.state.metrics[-1]
            log.info("iteration %d: %s%s(%.1f s)", state.iteration,
                     "" if result.mean_nll is None else f"train NLL {result.mean_nll:.3f}, ",
                     "" if test is None else f"test NLL {test:.3f} ", row["seconds"])
            if bar:
                bar.set_postfix(iteration=state.iteration,
                                **({"test": f"{test:.2f}"} if test is not None else {}))
        if bar:
            bar.close()
        state.seconds = time.perf_counter() - start_time
        return finish(self.out, prepared, self.volume, state.metrics,
                      gradient_evaluations=state.gradient_evaluations, seconds=state.seconds,
                      info=self._info(), title=f"{cfg.label}: {Path(self.config.particles).name}",
                      command=f"baseline ({cfg.label})", noise_precision=self.noise_precision,
                      world=world)

    def _test_nll(self) -> float | None:
        return self.prepared.test_nll(self.volume, self.noise_precision, world=self.world)

    def _log_metrics(self, objective, test, start_time) -> None:
        s = self.state
        values = {
            "iteration": s.iteration,
            "epoch": s.images_seen / self.prepared.n_train,
            "gradient_evaluations": s.gradient_evaluations,
            "minibatch_objective": objective,
            "test_nll": test,
            "learning_rate": None,
            "seconds": time.perf_counter() - start_time,
            # no frequency marching: every iteration works at the final cutoff
            "cutoff_resolution_a": self.prepared.geometry.cutoff_resolution_a,
        }
        s.metrics.append({name: values.get(name) for name in METRIC_FIELDS})

    def _info(self) -> dict:
        """config.json: the run's info without the optimiser fields, plus the baseline's."""
        info = run_info(self.prepared) | self.noise_and_mask.describe()
        for name in _UNUSED_FIELDS:
            info["config"].pop(name, None)
        info["baseline"] = self.baseline.to_dict()
        info["accounting"] = ("one iteration reads every training image once: counted as "
                              f"{self.prepared.n_train} gradient evaluations and one epoch")
        return info


def run_baseline(config: BaselineConfig, *, overwrite: bool = False,
                 progress: bool = True) -> ReconstructionResult:
    """Prepare the data and run the baseline; see `BaselineRun`. A failed run leaves no
    empty folder behind. Under torchrun, one rank of a data parallel run."""
    with joined(config.reconstruction.device) as world, \
            cleaned_up_by_main(world, config.reconstruction.out_path):
        config = dataclasses.replace(config, reconstruction=dataclasses.replace(
            config.reconstruction, device=world.device))  # cuda -> cuda:LOCAL_RANK
        return BaselineRun(config, overwrite=overwrite, progress=progress, world=world).run()


__all__ = ["METHOD_LABELS", "BaselineConfig", "BaselineRun", "run_baseline"]
