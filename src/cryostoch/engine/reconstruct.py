"""The reconstruction loop: particles in, map out (configs in, results out; no argparse).

One run: `prepare_run` (data, working geometry, normalisation, test split), the paper's random
start scaled to the data, then optimiser steps on minibatches in a seeded order that depends
only on the seed and the epoch (so every optimiser sees the same images in the same order, and
a resumed run repeats an uninterrupted one exactly). The cutoff and posterior temperature of
each step come from the pure `Schedule`. Progress is counted in gradient evaluations of single
images, as in the paper.

Under torchrun (`engine/distributed.py`) every rank draws the same minibatch, evaluates its
share of it, and the closure returns the all-reduced objective and gradient: the optimisers
only ever see whole-minibatch values, so every statistic they take from the closure
(calibration, Hessian-vector products, curvature pairs) is the global one and every rank takes
the same step. Rank 0 alone writes; checkpoints hold only this global state, so a run resumes
with any number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch import __version__
from cryostoch.engine.checkpoint import load_checkpoint, save_checkpoint
from cryostoch.engine.classes import update_classes
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import ONE_PROCESS, World, cleaned_up_by_main, joined
from cryostoch.engine.initial import initial_volume
from cryostoch.engine.noise_and_mask import NoiseAndMask
from cryostoch.engine.outputs import ReconstructionResult, finish, run_info
from cryostoch.engine.prepare import PreparedRun, prepare_run
from cryostoch.engine.progress import progress_bar
from cryostoch.engine.run_folder import (
    CHECKPOINT_NAME,
    open_run_folder,
)
from cryostoch.engine.schedule import Schedule, Stage
from cryostoch.engine.step_size import gauss_newton_curvature
from cryostoch.errors import DivergedError, InputError, SharedInputError
from cryostoch.io.mrc import write_map
from cryostoch.model.curvature import expected_curvature, fourier_preconditioner
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig
from cryostoch.optim.factory import make_optimizer

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything a checkpoint holds besides the config, the map and the optimiser."""

    iteration: int = 0
    images_seen: int = 0  # position in the concatenated per-epoch orders
    gradient_evaluations: int = 0
    seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    snapshots_done: list[int] = field(default_factory=list)
    stage: list[float] | None = None  # (cutoff radius, temperature) of the last step
    class_log_weights: list[float] | None = None  # (K,) log class proportions, K > 1


def epoch_order(n_train: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return torch.randperm(n_train, generator=g)


def minibatch_rows(state_images_seen: int, batch: int, n_train: int, seed: int) -> np.ndarray:
    """Training rows for the next minibatch, crossing epoch boundaries seamlessly."""
    rows = []
    position = state_images_seen
    while len(rows) < batch:
        epoch, offset = divmod(position, n_train)
        order = epoch_order(n_train, seed, epoch)
        take = min(batch - len(rows), n_train - offset)
        rows.extend(order[offset : offset + take].tolist())
        position += take
    return np.asarray(rows)


@dataclass(frozen=True)
class StageModel:
    """What one stage evaluates with."""

    stage: Stage
    model: MarginalLikelihood
    preconditioner: Tensor | None  # real, on the model's spectrum block
    noise_precision: Tensor | None  # (G, M) per optics group, None for white noise


class StageModels:
    """The likelihood, preconditioner and noise precision of the current stage, rebuilt when
    the stage changes (the noise model only changes then too)."""

    def __init__(self, run: PreparedRun, noise_and_mask: NoiseAndMask) -> None:
        self.run = run
        self.noise_and_mask = noise_and_mask
        self._current: StageModel | None = None

    def get(self, stage: Stage) -> StageModel:
        if self._current is None or self._current.stage != stage:
            run = self.run
            model = run.model_at(stage.radius_px, stage.temperature)
            precision = self.noise_and_mask.precision(model)
            preconditioner = None
            if run.config.uses_fourier_preconditioner:
                sample = torch.arange(min(run.n_train, 1000))
                mean_precision = None if precision is None \
                    else precision[run.train.optics_index[sample]].mean(0)
                preconditioner = fourier_preconditioner(expected_curvature(
                    model, run.train.ctf.index(sample), mean_precision))
            self._current = StageModel(stage, model, preconditioner, precision)
            log.debug("cutoff radius %.2f px (%.1f A)", stage.radius_px,
                      run.geometry.resolution_a(stage.radius_px))
        return self._current


class Reconstruction:
    """A prepared run; `run()` iterates until the configured number of epochs. Given
    `prepared` (tune-lr: several short runs on one preparation), no folder is opened and only
    `optimise()`, which writes nothing, may be called."""

    def __init__(self, config: ReconstructionConfig, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True,
                 world: World = ONE_PROCESS, prepared: PreparedRun | None = None) -> None:
        if world.size > config.effective_batch_size:  # every rank finds it; rank 0 says it
            raise (InputError if world.is_main else SharedInputError)(
                "--batch-size", f"{config.effective_batch_size} images cannot be shared by "
                f"{world.size} processes: give each at least one")
        self.config = config
        self.world = world
        self.progress = progress and world.is_main
        self.out = config.out_path
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        # a damaged or foreign checkpoint fails before the data are prepared; rank 0 reads it
        # and hands it to the others (the folder may be on rank 0's node only)
        saved = None if prepared is not None else \
            world.on_main(lambda: self._open_folder(resume, overwrite))
        self.prepared = prepared or prepare_run(config, progress=self.progress, world=world)
        self.schedule = Schedule.from_config(config, self.prepared.geometry.cutoff_radius_px,
                                             self.prepared.n_train)
        if config.epochs is None:
            log.info("from the data: %.3g epochs (%d minibatch steps; --epochs)",
                     self.schedule.total_images / self.prepared.n_train,
                     math.ceil(self.schedule.total_images / config.effective_batch_size))
        self.noise_and_mask = NoiseAndMask(self.prepared)
        self.stages = StageModels(self.prepared, self.noise_and_mask)
        self.prior = PriorConfig(config.lambda_plus, config.lambda_minus, config.prior_beta)
        self.state = RunState()
        self.volume: Tensor
        self.optimizer: torch.optim.Optimizer
        if saved is not None:
            self._restore(saved)
        else:
            if resume:
                log.warning("no checkpoint in %s: starting from the beginning", self.out)
            self.volume = initial_volume(self.prepared, self.schedule.radius_px(0),
                                         self.noise_and_mask.precision(self.prepared.model))
            self.noise_and_mask.apply_(self.volume)
            self._make_optimizer()
        # the stage whose step size is calibrated (a resumed run's already is)
        self._calibrated_stage = self.state.stage

    def _open_folder(self, resume: bool, overwrite: bool) -> dict | None:
        """Check and create the output folder; the checkpoint's state when resuming."""
        open_run_folder(self.out, overwrite=overwrite, resume=resume)
        return self._saved_state() if resume and self.checkpoint_path.exists() else None

    def _make_optimizer(self) -> None:
        self.volume = self.volume.detach().clone().requires_grad_(True)
        self.optimizer = make_optimizer(self.config.optimizer, [self.volume], lr=self.config.lr,
                                        **dict(self.config.optimizer_options))

    def _saved_state(self) -> dict:
        """The checkpoint's state, checked to continue this configuration."""
        state = load_checkpoint(self.checkpoint_path)
        try:
            saved = ReconstructionConfig.from_dict(state["config"])
        except (TypeError, ValueError) as err:
            raise InputError(self.checkpoint_path, f"holds an unusable configuration ({err}); "
                             "remove it or use --overwrite") from None
        if saved.trajectory_fields() != self.config.trajectory_fields():
            changed = sorted(k for k, v in self.config.trajectory_fields().items()
                             if saved.trajectory_fields().get(k) != v)
            raise InputError(self.checkpoint_path,
                             f"was written with different settings ({', '.join(changed)}); "
                             "use another --out or the same options to resume")
        return state

    def _restore(self, state: dict) -> None:
        self.volume = state["volume"].to(device=self.prepared.device, dtype=self.prepared.dtype)
        self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_and_mask.load_state_dict(state.get("noise_and_mask", {}))
        self.state = RunState(**state["run"])
        log.info("resumed from %s at iteration %d", self.checkpoint_path, self.state.iteration)

    # -------------------------------------------------------------------------- loop
    @property
    def total_images(self) -> int:
        return self.schedule.total_images

    def _enter_stage(self) -> StageModel:
        """The stage's model. A new stage measures the step size again (unless --lr is
        fixed), lets the solvent mask follow the map and measures the class proportions."""
        stage = self.schedule.stage(self.state.images_seen)
        key = stage.key()
        changed = self.state.stage is not None and self.state.stage != key
        if changed:
            if self.config.lr is None:
                self.optimizer.recalibrate()
            with torch.no_grad():  # no drift away from the group (rounding, the mask's edge)
                self.volume.copy_(self.prepared.symmetrize(self.volume.detach()))
            self.noise_and_mask.follow(self.volume.detach())
            self.noise_and_mask.apply_(self.volume)
        self.state.stage = key
        if changed and self.config.noise_update:
            model = self.prepared.model_at(stage.radius_px)
            # before `stages.get` below builds the new stage with the new precision
            self.noise_and_mask.reestimate(self.prepared, model, self.volume,
                                           self._class_log_weights(), self.world)
        current = self.stages.get(stage)
        if changed and self.config.classes > 1:
            generator = torch.Generator().manual_seed(self.config.seed + self.state.iteration)
            self.state.class_log_weights = update_classes(
                self.prepared, current.model, self.volume, current.noise_precision,
                self._class_log_weights().tolist(), generator, self.world)
        return current

    def _class_log_weights(self) -> Tensor | None:
        """(K,) log class proportions (uniform until first measured); None for one class."""
        k = self.config.classes
        if k == 1:
            return None
        if self.state.class_log_weights is None:
            return torch.full((k,), -math.log(k), dtype=torch.float64)
        return torch.tensor(self.state.class_log_weights, dtype=torch.float64)

    def _closure(self, rows: np.ndarray, current: StageModel):
        """The objective on one minibatch at the current map; sets .grad, returns the value."""
        prepared, model = self.prepared, current.model
        index = self.world.share(torch.as_tensor(rows))  # this rank's share of the minibatch
        blocks = model.crop_blocks(prepared.train.blocks[index]).to(prepared.device,
                                                                    non_blocking=True)
        ctf = prepared.train.ctf.index(index)
        precision = prepared.train.noise_precision(current.noise_precision, index)
        class_log_weights = self._class_log_weights()
        # one process: the plain minibatch mean (bit-identical to a run without torchrun)
        shares = {"batch_total": len(rows), "sum_over_shares": self.world.sum_} \
            if self.world.parallel else {}

        def closure() -> Tensor:
            out = minibatch_objective(self.volume.detach(), blocks, ctf, model, self.prior,
                                      prepared.n_train, preconditioner=current.preconditioner,
                                      likelihood_weight=model.config.noise_sigma**2,
                                      noise_precision=precision,
                                      class_log_weights=class_log_weights, **shares)
            # the gradient of f(S V) for the symmetrizing projection S: the map stays symmetric
            self.volume.grad = prepared.symmetrize(out.gradient)
            return out.value

        return closure

    def _test_nll(self) -> float | None:
        precision = self.noise_and_mask.precision(self.prepared.model)
        return self.prepared.test_nll(self.volume, precision, self._class_log_weights(),
                                      self.world)

    def _should_test(self, iteration: int, last: bool) -> bool:
        every = self.config.test_every
        early = iteration < every and (iteration & (iteration - 1)) == 0  # 0, 1, 2, 4, 8, ...
        return last or early or iteration % every == 0

    def _finished(self) -> bool:
        budget = self.config.gradient_budget
        return self.state.images_seen >= self.total_images or (
            budget is not None and self.state.gradient_evaluations >= budget)

    def _step(self, batch: int) -> float:
        """One optimiser step on the next minibatch; returns its objective (first evaluation)."""
        state = self.state
        rows = minibatch_rows(state.images_seen, batch, self.prepared.n_train, self.config.seed)
        current = self._enter_stage()
        calibration = self._supply_curvature(rows, current)
        objective = float(self.optimizer.step(self._closure(rows, current)))
        self.noise_and_mask.apply_(self.volume)
        state.iteration += 1
        state.images_seen += batch
        state.gradient_evaluations += (self.optimizer.last_step_closure_calls + calibration) * batch
        return objective

    def _supply_curvature(self, rows: np.ndarray, current: StageModel) -> int:
        """Before a step that calibrates (the first, and the first of a stage unless --lr is
        fixed), hand the optimiser the Gauss-Newton curvature bound (`engine/step_size.py`
        says why). Returns the minibatch evaluations it cost (0 or 1)."""
        calibrates = self.config.lr is None and (
            self.state.iteration == 0 or self.state.stage != self._calibrated_stage)
        supply = getattr(self.optimizer, "supply_curvature_scale", None)
        self._calibrated_stage = self.state.stage
        if not calibrates or supply is None:
            return 0
        scale = gauss_newton_curvature(
            self.prepared, current.model, self.volume, rows, self.world,
            preconditioner=current.preconditioner, noise_precision=current.noise_precision,
            class_log_weights=self._class_log_weights(), seed=self.config.seed)
        log.debug("curvature scale (Gauss-Newton) %.4g", scale)
        supply(scale)
        return 1

    def run(self) -> ReconstructionResult:
        cfg, state = self.config, self.state
        batch, total = cfg.effective_batch_size, self.total_images
        start_time = time.perf_counter() - state.seconds
        last_checkpoint = time.perf_counter()
        if self.world.is_main:
            (self.out / "snapshots").mkdir(exist_ok=True)
        bar = progress_bar(total, f"{cfg.optimizer} x {batch}", self.progress,
                           initial=min(state.images_seen, total), unit="img")
        if state.iteration == 0 and not state.metrics:
            self._log_metrics(None, self._test_nll(), start_time)
        while not self._finished():
            objective = self._step(batch)
            last = self._finished()
            test = self._test_nll() if self._should_test(state.iteration, last) else None
            self._log_metrics(objective, test, start_time)
            self._check_diverged(objective, test)  # before a snapshot or checkpoint of it
            self._snapshots()
            if bar:
                bar.update(min(batch, total - bar.n))
                bar.set_postfix(epoch=f"{state.images_seen / self.prepared.n_train:.2f}",
                                grads=state.gradient_evaluations, obj=f"{objective:.2f}",
                                **({"test": f"{test:.2f}"} if test is not None else {}))
            # rank 0's clock decides alone: writing needs no other rank
            due = time.perf_counter() - last_checkpoint >= cfg.checkpoint_interval_s or last
            if due and self.world.is_main:
                state.seconds = time.perf_counter() - start_time
                self._checkpoint()
                if not last:  # the end writes the full page
                    self._progress_report()
                last_checkpoint = time.perf_counter()
        if bar:
            bar.close()
        state.seconds = time.perf_counter() - start_time
        return finish(self.out, self.prepared, self.volume, state.metrics,
                      gradient_evaluations=state.gradient_evaluations, seconds=state.seconds,
                      info=run_info(self.prepared) | self.noise_and_mask.describe(),
                      noise_precision=self.noise_and_mask.precision(self.prepared.model),
                      class_log_weights=self._class_log_weights(),
                      title=f"{cfg.optimizer}: {Path(cfg.particles).name}",
                      command=f"reconstruct ({cfg.optimizer})", world=self.world)

    def optimise(self) -> float:
        """Steps until the run's length or gradient budget is spent, writing nothing (the
        short runs of tune-lr); the final held-out NLL, inf once the run diverges."""
        while not self._finished():
            objective = self._step(self.config.effective_batch_size)
            if not (math.isfinite(objective) and bool(torch.isfinite(self.volume).all())):
                return math.inf
        test = self._test_nll()
        return test if test is not None and math.isfinite(test) else math.inf

    def _check_diverged(self, objective: float, test: float | None) -> None:
        """InputError once the objective, the held-out NLL or the map is not finite."""
        finite = math.isfinite(objective) and (test is None or math.isfinite(test))
        if finite and bool(torch.isfinite(self.volume.detach()).all()):
            return
        raise DivergedError(self.config.particles,
                            f"the reconstruction diverged at iteration {self.state.iteration} "
                            "(the objective or the map became non-finite); no map written: "
                            "lower --lr")

    def _log_metrics(self, objective: float | None, test: float | None,
                     start_time: float) -> None:
        s = self.state
        lrs = self.optimizer.current_lrs() if hasattr(self.optimizer, "current_lrs") else [None]
        radius = self.schedule.radius_px(max(s.images_seen - 1, 0))
        s.metrics.append({
            "iteration": s.iteration,
            "epoch": s.images_seen / self.prepared.n_train,
            "gradient_evaluations": s.gradient_evaluations,
            "minibatch_objective": objective,
            "test_nll": test,
            "learning_rate": lrs[0] if lrs else None,
            "seconds": time.perf_counter() - start_time,
            # the minibatch objective is measured at this (stage) cutoff; test NLL at the final
            "cutoff_resolution_a": self.prepared.geometry.resolution_a(radius),
        })

    def _snapshots(self) -> None:
        volume = self.volume.detach()
        if volume.dim() == 4:  # classes: the currently largest one
            volume = volume[int(self._class_log_weights().argmax())]
        for count in self.config.snapshots:
            if count not in self.state.snapshots_done and self.state.gradient_evaluations >= count:
                if self.world.is_main:
                    write_map(self.out / "snapshots" / f"map_{count:09d}.mrc",
                              volume.float().cpu(), self.prepared.geometry.pixel_size_a)
                self.state.snapshots_done.append(count)

    def _progress_report(self) -> None:
        """report.html of the current map at a checkpoint (replaced by the final one; a
        failure to draw it only warns: it must not end a long run)."""
        from cryostoch.engine.html_report import (
            REPORT_HTML,
            reconstruction_report_html,
            write_report_html,
        )

        volume = self.volume.detach()
        if volume.dim() == 4:  # classes: the currently largest one
            volume = volume[int(self._class_log_weights().argmax())]
        try:
            write_report_html(self.out / REPORT_HTML, reconstruction_report_html(
                self.prepared, volume.float().cpu(), self.state.metrics,
                run_info(self.prepared) | self.noise_and_mask.describe(), None,
                command=f"reconstruct ({self.config.optimizer})", seconds=self.state.seconds,
                gradient_evaluations=self.state.gradient_evaluations, in_progress=True))
        except Exception as err:  # noqa: BLE001 (any drawing problem)
            log.warning("report.html not refreshed at this checkpoint: %s", err)

    def _checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, {
            "config": self.config.to_dict(),
            "volume": self.volume.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "run": self.state.__dict__,
            "noise_and_mask": self.noise_and_mask.state_dict(),
            "version": __version__,
        })


def reconstruct(config: ReconstructionConfig, *, resume: bool = False, overwrite: bool = False,
                progress: bool = True) -> ReconstructionResult:
    """Run a reconstruction into `config.out_dir` (see `open_run_folder` for the folder rules);
    a failed run leaves no empty folder behind. Under torchrun, one rank of a data parallel
    run (`engine/distributed.py`); every rank returns the same result."""
    with joined(config.device) as world, cleaned_up_by_main(world, config.out_path):
        config = dataclasses.replace(config, device=world.device)  # cuda -> cuda:LOCAL_RANK
        return Reconstruction(config, resume=resume, overwrite=overwrite, progress=progress,
                              world=world).run()
