"""The reconstruction loop: particles in, map out (configs in, results out; no argparse).

One run: open the particles, pick the working box and cutoff, preprocess every image once into
small Fourier blocks, hold out a test set, start from the paper's random density (scaled to the
data), then take optimiser steps on minibatches in a seeded order that depends only on the seed
and the epoch (so every optimiser sees the same images in the same order, and a resumed run
repeats an uninterrupted one exactly). Progress is counted in gradient evaluations of single
images, as in the paper.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch import __version__
from cryostoch.engine.checkpoint import load_checkpoint, save_checkpoint
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.preprocess import (
    PreparedParticles,
    estimate_normalisation,
    prepare_particles,
)
from cryostoch.errors import InputError
from cryostoch.fourier.resample import soft_low_pass
from cryostoch.geometry.quadrature import max_radius_px
from cryostoch.io.dataset import ParticleDataset, open_particles
from cryostoch.io.mrc import read_map, write_map
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import fourier_preconditioner, minibatch_objective
from cryostoch.model.prior import PriorConfig
from cryostoch.optim.factory import make_optimizer
from cryostoch.simulate.init import random_spheres_volume

log = logging.getLogger(__name__)

METRIC_FIELDS = (
    "iteration", "epoch", "gradient_evaluations", "minibatch_objective", "test_nll",
    "learning_rate", "seconds", "cutoff_resolution_a",
)


@dataclass
class RunState:
    """Everything a checkpoint holds besides the config."""

    iteration: int = 0
    images_seen: int = 0  # position in the concatenated per-epoch orders
    gradient_evaluations: int = 0
    seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    snapshots_done: list[int] = field(default_factory=list)
    stage: list[float] | None = None  # (cutoff radius, temperature) of the last step


@dataclass
class ReconstructionResult:
    out_dir: Path
    map_path: Path
    volume: Tensor
    final_test_nll: float | None
    gradient_evaluations: int
    seconds: float
    metrics: list[dict]


def working_geometry(config: ReconstructionConfig, dataset: ParticleDataset):
    """(working box, working pixel size, cutoff radius in Fourier pixels of the working box)."""
    box = config.box_size or dataset.box_size
    if box > dataset.box_size:
        raise InputError("--box", f"{box} is larger than the data's box {dataset.box_size}")
    pixel = dataset.pixel_size_a * dataset.box_size / box
    if config.resolution_a is not None:
        radius = box * pixel / config.resolution_a
        if radius > box / 2 - 3:
            raise InputError(
                "--resolution-a",
                f"{config.resolution_a} A is finer than the working box allows "
                f"(Nyquist {2 * pixel:.2f} A at {pixel:.3f} A/px)",
            )
    else:
        radius = max_radius_px(box, config.max_freq)
    if radius < 2:
        raise InputError("--max-freq", f"cutoff of {radius:.2f} Fourier pixels is too coarse")
    return box, pixel, radius


def select_particles(config: ReconstructionConfig, dataset: ParticleDataset) -> ParticleDataset:
    """Optional 2-D class selection and half-set split."""
    rows = np.arange(len(dataset))
    if config.class_file:
        import starfile

        try:
            blocks = starfile.read(config.class_file, always_dict=True)
        except Exception as err:  # starfile raises many kinds of parse errors
            raise InputError(config.class_file, f"cannot read STAR file ({err})") from None
        table = blocks.get("particles", next(iter(blocks.values())))
        if "rlnClassNumber" not in table.columns or "rlnImageName" not in table.columns:
            raise InputError(config.class_file, "needs rlnImageName and rlnClassNumber columns")
        if "rlnImageName" not in dataset.metadata.columns:
            raise InputError(config.particles, "class selection needs rlnImageName")
        keep = set(config.keep_classes)
        if not keep:
            raise InputError("--keep-classes", "give the class numbers to keep")
        names = set(table.loc[table["rlnClassNumber"].isin(keep), "rlnImageName"])
        rows = rows[dataset.metadata["rlnImageName"].isin(names).to_numpy()]
        if len(rows) == 0:
            raise InputError(config.class_file, f"no particles in classes {sorted(keep)}")
    if config.half_set is not None:
        rows = rows[(config.half_set - 1) :: 2]
    return dataset.subset(rows) if len(rows) != len(dataset) else dataset


def data_signal_power(model: MarginalLikelihood, particles: PreparedParticles) -> float:
    """Mean signal power per image inside the cutoff: E||I||^2 - (noise dof), noise sigma 1."""
    coeffs = model.image_coefficients(particles.blocks[:2000].to(model.device))
    power = (coeffs.real**2 + coeffs.imag**2).to(model.dtype) @ model.weights_k
    return float(power.mean()) - model.coefficients.degrees_of_freedom


def model_signal_power(model: MarginalLikelihood, volume: Tensor, particles) -> float:
    """Mean power of C * projection over directions and images, inside the cutoff."""
    from cryostoch.operators.ctf import evaluate_ctf

    with torch.no_grad():
        slices = model.slices(volume)
    mean_slice_power = (slices.abs() ** 2).mean(0)  # (M,), average over directions
    ctf = particles.ctf.index(torch.arange(min(len(particles), 500)))
    c2 = evaluate_ctf(ctf.to(device=model.device), model.rotated_freq_x_per_a,
                      model.rotated_freq_y_per_a).pow(2).mean((0, 1)).to(model.dtype)
    return float((model.weights_k * c2 * mean_slice_power).sum())


def initial_volume(config, model, particles, particle_radius_px, generator,
                   band_limit_px: float | None = None) -> Tensor:
    """The starting density, band-limited to the cutoff and scaled to the data's signal power.

    The likelihood sees nothing beyond the cutoff, so content above it (sharp sphere edges)
    would never change: the start is low-passed to the cutoff with a soft two-pixel edge. Maps
    come in arbitrary units, so the start is scaled so that its CTF-modulated projections
    carry the signal power measured in the (noise-normalised) images.
    """
    box = model.config.box_size
    if config.init == "random":
        volume = random_spheres_volume(
            box, particle_radius_px, generator, dtype=torch.float64, device=model.device
        )
    else:
        volume, _ = read_map(config.init)
        if volume.shape[-1] != box:
            from cryostoch.fourier.resample import resample_volume

            volume = resample_volume(volume.to(torch.float64), box)
        volume = volume.to(device=model.device, dtype=torch.float64)
    # Band-limit to the first stage's cutoff: detail above it would sit unconstrained while
    # the cutoff is low and bias the poses once it rises (model bias from the start).
    radius = band_limit_px or model.config.max_radius_px
    volume = soft_low_pass(volume, radius, 2.0, ndim=3).to(model.dtype)
    target = data_signal_power(model, particles)
    predicted = model_signal_power(model, volume, particles)
    if target <= 0:
        log.warning("no signal power detected above the noise; using a unit-scale start")
        target = 0.01 * model.coefficients.degrees_of_freedom
    if not predicted > 0:
        raise InputError(config.init, "the initial map has no density inside the cutoff")
    scale = math.sqrt(target / predicted)
    log.info("initial density scaled by %.4g to match the data's signal power", scale)
    return volume * scale


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


class Reconstruction:
    """A prepared run; `run()` iterates until the configured number of epochs."""

    def __init__(self, config: ReconstructionConfig, *, resume: bool = False,
                 progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = config.out_path
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device", "CUDA was requested but torch sees no GPU")
        self.dtype = getattr(torch, config.dtype)

        dataset = open_particles(config.particles, project_root=config.project_root)
        if dataset.ctf is None:
            raise InputError(config.particles, "no CTF parameters: reconstruction needs them")
        self.dataset = select_particles(config, dataset)
        box, pixel, radius = working_geometry(config, self.dataset)
        self.box, self.pixel_size_a, self.radius = box, pixel, radius
        diameter_a = config.particle_diameter_a or 0.8 * box * pixel
        self.particle_radius_px = min(0.5 * diameter_a / pixel, box / 2 - 2)
        shift_radius_px = config.shift_range_a / pixel
        sigma_a = config.shift_sigma_a or max(config.shift_range_a / 2, pixel)
        self.likelihood_options = dict(
            box_size=box,
            pixel_size_a=pixel,
            volume_oversampling=config.volume_oversampling,
            image_oversampling=config.image_oversampling,
            shift_radius_px=shift_radius_px,
            shift_sigma_px=sigma_a / pixel,
            memory_budget_mb=config.memory_budget_mb,
        )
        # The final-cutoff model: it lays out the preprocessed blocks, scores the held-out
        # set at every point of the run (so curves stay comparable) and gives the poses.
        self.model = self._make_model(radius)
        self.prior = PriorConfig(config.lambda_plus, config.lambda_minus, config.prior_beta)
        self._prepare()
        self._stage: tuple[float, MarginalLikelihood, Tensor | None] | None = None
        self.state = RunState()
        self.volume: Tensor
        self.optimizer: torch.optim.Optimizer
        if resume and self.checkpoint_path.exists():
            self._restore()
        else:
            if resume:
                log.warning("no checkpoint in %s: starting from the beginning", self.out)
            g = torch.Generator().manual_seed(config.seed)
            self.volume = initial_volume(config, self.model, self.train, self.particle_radius_px,
                                         g, band_limit_px=self.stage_radius(0))
            self._make_optimizer()

    # ------------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        data = self.dataset
        if cfg.box_size and cfg.box_size != data.box_size:
            from cryostoch.engine.preprocess import ResampledDataset

            data = ResampledDataset(data, cfg.box_size)
        stats = estimate_normalisation(data, self.particle_radius_px, generator=g,
                                       invert=cfg.invert)
        log.info(
            "noise sigma %.4g (background of %d images); contrast %s (score %+.3f)%s",
            stats.noise_sigma, stats.n_images_used,
            "protein white" if stats.contrast_sign > 0 else "protein black: inverting",
            stats.sign_score, "" if cfg.invert is None else " [forced by --invert]",
        )
        bar = _progress_bar(len(data), "preprocessing", self.progress)
        prepared = prepare_particles(data, self.model, stats, self.particle_radius_px,
                                     progress=bar.update if bar else None)
        if bar:
            bar.close()
        self.prepared = prepared
        n = len(prepared)
        if n <= cfg.test_size:
            raise InputError(cfg.particles,
                             f"{n} particles leave none for training after {cfg.test_size} "
                             "held-out test images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919))
        self.test_rows = perm[: cfg.test_size].sort().values.numpy()
        self.train_rows = perm[cfg.test_size :].sort().values.numpy()
        self.train = prepared.subset(self.train_rows)
        self.test = prepared.subset(self.test_rows) if cfg.test_size else None
        on_device = self.device.type != "cpu"
        if on_device:
            self.train.blocks = self.train.blocks.to(self.device)
            if self.test is not None:
                self.test.blocks = self.test.blocks.to(self.device)

    def _make_model(self, radius: float, temperature: float = 1.0) -> MarginalLikelihood:
        return MarginalLikelihood(
            LikelihoodConfig(max_radius_px=radius, noise_sigma=math.sqrt(temperature),
                             **self.likelihood_options),
            dtype=self.dtype,
            device=self.device,
        )

    def stage_radius(self, images_seen: int) -> float:
        """Cutoff radius for the next minibatch: frequency marching.

        The objective is well behaved while the low frequencies are right (paper, section
        3.1), so the cutoff starts at `start_freq_fraction` of the final one and rises
        geometrically over `marching_stages` equal stages spanning the first
        `marching_fraction` of the run; the rest runs at the final cutoff.
        """
        cfg = self.config
        final = self.radius
        start = max(min(final, 3.0), final * cfg.start_freq_fraction)
        span = cfg.marching_fraction * self.total_images
        if start >= final or span <= 0 or images_seen >= span or cfg.marching_stages == 1:
            return final
        stage = int(images_seen / span * cfg.marching_stages)
        return start * (final / start) ** (stage / cfg.marching_stages)

    def stage_temperature(self, images_seen: int) -> float:
        """Posterior temperature: from `start_temperature` down to 1 over the marching span,
        in the same stages as the cutoff."""
        cfg = self.config
        span = cfg.marching_fraction * self.total_images
        if cfg.start_temperature == 1 or span <= 0 or images_seen >= span:
            return 1.0
        stage = int(images_seen / span * cfg.marching_stages)
        return cfg.start_temperature ** (1 - stage / cfg.marching_stages)

    def _stage_model(self) -> tuple[MarginalLikelihood, Tensor | None]:
        radius = self.stage_radius(self.state.images_seen)
        temperature = self.stage_temperature(self.state.images_seen)
        if self._stage is None or self._stage[0] != (radius, temperature):
            if radius == self.radius and temperature == 1.0:
                model = self.model
            else:
                model = self._make_model(radius, temperature)
            preconditioner = None
            if self.config.uses_fourier_preconditioner:
                sample = self.train.ctf.index(torch.arange(min(len(self.train), 1000)))
                preconditioner = fourier_preconditioner(model.expected_curvature(sample))
            self._stage = ((radius, temperature), model, preconditioner)
            key = [radius, temperature]
            if self.state.stage is not None and self.state.stage != key:
                # A new stage has another curvature: measure the step size again (costs one
                # gradient evaluation) unless the user fixed --lr.
                if self.config.lr is None:
                    for group in self.optimizer.param_groups:
                        if "lr" in group and group.get("recalibrate", True):
                            group["lr"] = None
            self.state.stage = key
            log.debug("cutoff radius %.2f px (%.1f A)", radius, self.box * self.pixel_size_a
                      / radius)
        return self._stage[1], self._stage[2]

    def _make_optimizer(self) -> None:
        self.volume = self.volume.detach().clone().requires_grad_(True)
        options = dict(self.config.optimizer_options)
        self.optimizer = make_optimizer(self.config.optimizer, [self.volume], lr=self.config.lr,
                                        **options)

    def _restore(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        saved = ReconstructionConfig.from_dict(state["config"])
        if saved.trajectory_fields() != self.config.trajectory_fields():
            changed = sorted(k for k, v in self.config.trajectory_fields().items()
                             if saved.trajectory_fields().get(k) != v)
            raise InputError(self.checkpoint_path,
                             f"was written with different settings ({', '.join(changed)}); "
                             "use another --out or the same options to resume")
        self.volume = state["volume"].to(device=self.device, dtype=self.dtype)
        self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = RunState(**state["run"])
        log.info("resumed from %s at iteration %d", self.checkpoint_path, self.state.iteration)

    # -------------------------------------------------------------------------- loop
    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def total_images(self) -> int:
        return int(round(self.config.epochs * self.n_train))

    def _closure_for(self, rows: np.ndarray, record: dict):
        model, preconditioner = self._stage_model()
        blocks = model.crop_blocks(self.train.blocks[torch.as_tensor(rows)]).to(
            self.device, non_blocking=True
        )
        ctf = self.train.ctf.index(torch.as_tensor(rows))

        def closure() -> Tensor:
            out = minibatch_objective(self.volume.detach(), blocks, ctf, model, self.prior,
                                      self.n_train, preconditioner=preconditioner,
                                      likelihood_weight=model.config.noise_sigma**2)
            self.volume.grad = out.gradient
            record.setdefault("first", out)
            return out.value

        return closure

    def test_nll(self) -> float | None:
        if self.test is None:
            return None
        total = 0.0
        with torch.no_grad():
            slices = self.model.slices(self.volume.detach())
            for start in range(0, len(self.test), 100):
                blocks = self.test.blocks[start : start + 100].to(self.device)
                ctf = self.test.ctf.index(torch.arange(start, min(start + 100, len(self.test))))
                total += float(self.model.evaluate(slices, blocks, ctf).nll.sum())
        return total / len(self.test)

    def _should_test(self, iteration: int, last: bool) -> bool:
        every = self.config.test_every
        early = iteration < every and (iteration & (iteration - 1)) == 0  # 0, 1, 2, 4, 8, ...
        return last or early or iteration % every == 0

    def run(self) -> ReconstructionResult:
        cfg = self.config
        batch = cfg.effective_batch_size
        total = self.total_images
        state = self.state
        start_time = time.perf_counter() - state.seconds
        last_checkpoint = time.perf_counter()
        (self.out / "snapshots").mkdir(exist_ok=True)
        bar = _progress_bar(total, f"{cfg.optimizer} x {batch}", self.progress,
                            initial=min(state.images_seen, total), unit="img")
        if state.iteration == 0 and not state.metrics:
            self._log_metrics(None, self.test_nll(), start_time)
        budget = cfg.gradient_budget
        while state.images_seen < total and (budget is None
                                             or state.gradient_evaluations < budget):
            rows = minibatch_rows(state.images_seen, batch, self.n_train, cfg.seed)
            record: dict = {}
            closure = self._closure_for(rows, record)
            self.optimizer.step(closure)
            calls = self.optimizer.last_step_closure_calls
            state.iteration += 1
            state.images_seen += batch
            state.gradient_evaluations += calls * batch
            last = state.images_seen >= total or (
                budget is not None and state.gradient_evaluations >= budget)
            objective = float(record["first"].value)
            test = self.test_nll() if self._should_test(state.iteration, last) else None
            self._log_metrics(objective, test, start_time)
            self._snapshots()
            if bar:
                bar.update(min(batch, total - bar.n))
                bar.set_postfix(epoch=f"{state.images_seen / self.n_train:.2f}",
                                grads=state.gradient_evaluations, obj=f"{objective:.2f}",
                                **({"test": f"{test:.2f}"} if test is not None else {}))
            if not math.isfinite(objective):
                raise InputError(cfg.particles, "the objective became non-finite: lower --lr")
            if time.perf_counter() - last_checkpoint >= cfg.checkpoint_interval_s or last:
                state.seconds = time.perf_counter() - start_time
                self._checkpoint()
                last_checkpoint = time.perf_counter()
        if bar:
            bar.close()
        state.seconds = time.perf_counter() - start_time
        return self._finish()

    def _log_metrics(self, objective, test, start_time) -> None:
        s = self.state
        lrs = self.optimizer.current_lrs() if hasattr(self.optimizer, "current_lrs") else [None]
        radius = self.stage_radius(max(s.images_seen - 1, 0))
        s.metrics.append({
            "iteration": s.iteration,
            "epoch": s.images_seen / self.n_train,
            "gradient_evaluations": s.gradient_evaluations,
            "minibatch_objective": objective,
            "test_nll": test,
            "learning_rate": lrs[0] if lrs else None,
            "seconds": time.perf_counter() - start_time,
            # the minibatch objective is measured at this (stage) cutoff; test NLL at the final
            "cutoff_resolution_a": self.box * self.pixel_size_a / radius,
        })

    def _snapshots(self) -> None:
        for count in self.config.snapshots:
            if count not in self.state.snapshots_done and self.state.gradient_evaluations >= count:
                write_map(self.out / "snapshots" / f"map_{count:09d}.mrc",
                          self.volume.detach().float().cpu(), self.pixel_size_a)
                self.state.snapshots_done.append(count)

    def _checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, {
            "config": self.config.to_dict(),
            "volume": self.volume.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "run": self.state.__dict__,
            "version": __version__,
        })

    # ------------------------------------------------------------------------ outputs
    def _finish(self) -> ReconstructionResult:
        volume = self.volume.detach().float().cpu()
        map_path = self.out / "map.mrc"
        write_map(map_path, volume, self.pixel_size_a)
        if self.box != self.dataset.box_size:
            from cryostoch.fourier.resample import resample_volume

            write_map(self.out / "map_fullbox.mrc",
                      resample_volume(volume.double(), self.dataset.box_size).float(),
                      self.dataset.pixel_size_a)
        self._write_metrics()
        self._write_config()
        if self.config.write_poses:
            self._write_poses()
        final = next((m["test_nll"] for m in reversed(self.state.metrics)
                      if m["test_nll"] is not None), None)
        from cryostoch.evaluate.plots import reconstruction_report

        reconstruction_report(self.out / "report.png", volume, self.state.metrics,
                              title=self._report_title())
        return ReconstructionResult(self.out, map_path, volume, final,
                                    self.state.gradient_evaluations, self.state.seconds,
                                    self.state.metrics)

    def _report_title(self) -> str:
        return f"{self.config.optimizer}: {Path(self.config.particles).name}"

    def _write_metrics(self) -> None:
        path = self.out / "metrics.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in self.state.metrics:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        tmp.replace(path)

    def _write_config(self) -> None:
        info = {
            "config": self.config.to_dict(),
            "working_box": self.box,
            "working_pixel_size_a": self.pixel_size_a,
            "cutoff_radius_px": self.radius,
            "cutoff_resolution_a": self.box * self.pixel_size_a / self.radius,
            "quadrature": {"directions": self.model.n_directions,
                           "inplane": self.model.n_inplane, "shifts": self.model.n_shifts},
            "particles": {"total": len(self.prepared), "train": self.n_train,
                          "test": len(self.test_rows)},
            "normalisation": self.prepared.statistics.__dict__,
            "versions": {"cryostoch": __version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
        }
        (self.out / "config.json").write_text(json.dumps(info, indent=2, default=str))

    def _write_poses(self) -> None:
        """Most probable pose of every particle under the final map, as a RELION STAR."""
        from cryostoch.io.records import Poses
        from cryostoch.io.star import write_particles_star

        n = len(self.prepared)
        best = torch.empty(n, dtype=torch.long)
        prob = torch.empty(n, dtype=torch.float64)
        nll = torch.empty(n, dtype=torch.float64)
        with torch.no_grad():
            slices = self.model.slices(self.volume.detach())
            for start in range(0, n, 200):
                stop = min(n, start + 200)
                res = self.model.evaluate(slices, self.prepared.blocks[start:stop].to(self.device),
                                          self.prepared.ctf.index(torch.arange(start, stop)))
                best[start:stop] = res.best_pose_index.cpu()
                prob[start:stop] = res.best_pose_probability.double().cpu()
                nll[start:stop] = res.nll.double().cpu()
        euler, shifts_px = self.model.pose_parameters(best)
        # shifts in the data's pixels (the working box may be Fourier-cropped)
        shifts_data_px = shifts_px * (self.pixel_size_a / self.dataset.pixel_size_a)
        optics, table = self.dataset.relion_tables(
            poses=Poses(euler.cpu(), shifts_data_px.cpu()), absolute_paths=True
        )
        table = table.reset_index(drop=True)
        table["rlnMaxValueProbDistribution"] = prob.numpy()
        table["rlnLogLikeliContribution"] = (-nll).numpy()
        write_particles_star(self.out / "poses.star", optics, table)


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "img"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                smoothing=0.1)


def reconstruct(config: ReconstructionConfig, *, resume: bool = False,
                progress: bool = True) -> ReconstructionResult:
    return Reconstruction(config, resume=resume, progress=progress).run()
