"""What a finished run writes: maps, metrics.csv, config.json, poses.star, report.png,
report.html (`engine.html_report`) and open_in_chimerax.cxc.

Plain functions of the prepared run and the final state, shared by the stochastic runs and the
baselines.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch import __version__
from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.prepare import PreparedRun
from cryostoch.engine.run_folder import CHIMERAX_SCRIPT, StagedOutputs
from cryostoch.engine.schedule import run_epochs
from cryostoch.engine.viewer import ViewedMap, write_chimerax_script
from cryostoch.errors import DivergedError
from cryostoch.fourier.resample import resample_volume, soft_low_pass
from cryostoch.io.mrc import write_map

METRIC_FIELDS = (
    "iteration", "epoch", "gradient_evaluations", "minibatch_objective", "test_nll",
    "learning_rate", "seconds", "cutoff_resolution_a",
)


@dataclass
class ReconstructionResult:
    out_dir: Path
    map_path: Path
    volume: Tensor
    final_test_nll: float | None
    gradient_evaluations: int
    seconds: float
    metrics: list[dict]


def write_maps(staged: StagedOutputs, run: PreparedRun, volume: Tensor) -> list[ViewedMap]:
    """map_fullbox.mrc at the data's box when it differs from the working box, then map.mrc
    (asked for last: it is renamed last, marking a complete set). Returns both, map.mrc first,
    as the viewer script opens them."""
    geometry, dataset = run.geometry, run.dataset
    written = [ViewedMap("map.mrc", volume, geometry.pixel_size_a, "the final map", shown=True)]
    if geometry.box_size != dataset.box_size:
        fullbox = resample_volume(volume.double(), dataset.box_size).float()
        write_map(staged.path("map_fullbox.mrc"), fullbox, dataset.pixel_size_a)
        written.append(ViewedMap("map_fullbox.mrc", fullbox, dataset.pixel_size_a,
                                 "the map at the data's box and pixel size"))
    write_map(staged.path("map.mrc"), volume, geometry.pixel_size_a)
    return written


OUTPUT_LOW_PASS_EDGE_PX = 2.0  # the raised-cosine edge of map.mrc's low-pass, Fourier px


def reached_cutoff_radius_px(run: PreparedRun, metrics: list[dict]) -> float:
    """The likelihood cutoff (Fourier pixels of the working box) at the run's last recorded
    step: the final one unless the run stopped while marching."""
    reached = next((m["cutoff_resolution_a"] for m in reversed(metrics)
                    if m.get("cutoff_resolution_a")), None)
    if reached is None:
        return run.geometry.cutoff_radius_px
    geometry = run.geometry
    return min(geometry.box_size * geometry.pixel_size_a / reached, geometry.cutoff_radius_px)


def band_limited(volume: Tensor, run: PreparedRun, radius_px: float) -> Tensor:
    """`volume` (..., N, N, N) low-passed at `radius_px`, the cutoff the run reached
    (`reached_cutoff_radius_px`, Fourier pixels of the working box), with a 2-px raised
    cosine edge beyond it (as refine low-passes its start). Beyond the cutoff no image
    constrains the map: what is there comes from the random start and the prior, and on the
    real beta-galactosidase set it made the default map's short axes 30-45% too thick at a
    molecular-volume threshold (180 x 173 x 117 A against 180 x 131 x 81 A filtered). With
    a given --mask the filtered map is masked again: the filter's ringing must not put
    density where the user excluded it."""
    filtered = soft_low_pass(volume, radius_px, OUTPUT_LOW_PASS_EDGE_PX, ndim=3)
    if run.given_mask is not None:
        filtered = filtered * run.given_mask.to(filtered.dtype)
    return filtered


def write_metrics(path: Path, metrics: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in metrics:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    tmp.replace(path)


def run_info(run: PreparedRun) -> dict:
    """The configuration and what was found and chosen from the data (config.json)."""
    geometry, model = run.geometry, run.model
    return {
        "config": run.config.to_dict(),
        "working_box": geometry.box_size,
        "working_pixel_size_a": geometry.pixel_size_a,
        "cutoff_radius_px": geometry.cutoff_radius_px,
        "cutoff_resolution_a": geometry.cutoff_resolution_a,
        "shift_range_a": geometry.shift_range_a,
        "particle_diameter_a": 2 * geometry.particle_radius_px * geometry.pixel_size_a,
        "epochs": run_epochs(run.config, run.n_train),
        "chosen_from_data": list(geometry.chosen),
        "quadrature": {"directions": model.n_directions, "inplane": model.n_inplane,
                       "shifts": model.n_shifts},
        "particles": {"total": len(run.particles), "train": run.n_train,
                      "test": len(run.test_rows)},
        "normalisation": run.particles.statistics.__dict__,
        "versions": {"cryostoch": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }


@dataclass
class PoseAssignment:
    """Each particle's most probable pose under the final map(s); all (n,) on the CPU."""

    best_pose_index: Tensor  # flat pose index (class-major directions with classes)
    probability: Tensor  # float64 posterior probability of that pose
    nll: Tensor  # float64 negative log marginal likelihood
    classes: Tensor  # 0-based class


def assign_poses(run: PreparedRun, volume: Tensor, noise_precision: Tensor | None = None,
                 class_log_weights: Tensor | None = None,
                 world: World = ONE_PROCESS) -> PoseAssignment:
    """Score every particle against `volume` (N, N, N) or (K, N, N, N) at the final cutoff
    (each rank of `world` its share; every rank gets all of them).

    noise_precision: (G, M) per optics group at the final model's coefficients (coloured
    noise) or None (white); class_log_weights: (K,) log class proportions or None."""
    model, particles = run.model, run.particles
    n = len(particles)
    best = [torch.zeros(0, dtype=torch.long)]  # a rank's share may be empty
    prob, nll = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    with torch.no_grad():
        slices = model.slices(volume.detach())
        for _, _, res in particles.evaluate_chunks(
                model, slices, world.share(torch.arange(n)), noise_precision=noise_precision,
                class_log_weights=class_log_weights):
            best.append(res.best_pose_index.cpu())
            prob.append(res.best_pose_probability.double().cpu())
            nll.append(res.nll.double().cpu())
    best = world.gathered_rows(n, torch.cat(best))
    return PoseAssignment(best, world.gathered_rows(n, torch.cat(prob)),
                          world.gathered_rows(n, torch.cat(nll)), model.class_of(best).cpu())


def write_poses(path: Path, run: PreparedRun, poses: PoseAssignment) -> None:
    """The particles with their most probable pose (and class), as a RELION 3.1 STAR."""
    from cryostoch.io.records import Poses
    from cryostoch.io.star import write_particles_star

    euler, shifts_px = run.model.pose_parameters(poses.best_pose_index)
    # shifts in the data's pixels (the working box may be Fourier-cropped)
    shifts_data_px = shifts_px * (run.geometry.pixel_size_a / run.dataset.pixel_size_a)
    optics, table = run.dataset.relion_tables(
        poses=Poses(euler.cpu(), shifts_data_px.cpu()), absolute_paths=True
    )
    table = table.reset_index(drop=True)
    if run.config.classes > 1:
        table["rlnClassNumber"] = (poses.classes + 1).numpy()
    if run.config.half_set is not None:  # RELION's gold-standard half-set label
        table["rlnRandomSubset"] = run.config.half_set
    table["rlnMaxValueProbDistribution"] = poses.probability.numpy()
    table["rlnLogLikeliContribution"] = (-poses.nll).numpy()
    write_particles_star(path, optics, table)


def write_class_maps(staged: StagedOutputs, run: PreparedRun, volume: Tensor,
                     classes: Tensor) -> dict:
    """class_NN.mrc for every class of `volume` (K, N, N, N); returns what config.json records
    (class sizes, from each particle's most probable class (n,)), largest class first."""
    sizes = torch.bincount(classes, minlength=volume.shape[0])
    for c in range(volume.shape[0]):
        write_map(staged.path(f"class_{c + 1:02d}.mrc"), volume[c], run.geometry.pixel_size_a)
    order = torch.argsort(sizes, descending=True, stable=True)
    return {"classes": [{"class": int(c) + 1, "particles": int(sizes[c]),
                         "map": f"class_{int(c) + 1:02d}.mrc"} for c in order]}


def check_finite_result(run: PreparedRun, volume: Tensor, poses: PoseAssignment | None,
                        metrics: list[dict]) -> None:
    """InputError if the final map diverged: non-finite voxels, or a held-out or per-particle
    NLL that is not finite (a map of 1e29 is finite but its likelihood is not)."""
    last_test = metrics[-1]["test_nll"] if metrics else None
    bad = not bool(torch.isfinite(volume).all()) or (
        last_test is not None and not math.isfinite(last_test)) or (
        poses is not None and not bool(torch.isfinite(poses.nll).all()))
    if bad:
        raise DivergedError(run.config.particles, "the reconstruction diverged (the final map "
                            "or its likelihood is not finite); no map written: lower --lr")


def finish(out: Path, run: PreparedRun, volume: Tensor, metrics: list[dict], *,
           gradient_evaluations: int, seconds: float, info: dict, title: str,
           command: str = "reconstruct", noise_precision: Tensor | None = None,
           class_log_weights: Tensor | None = None,
           world: World = ONE_PROCESS) -> ReconstructionResult:
    """Write every output of a finished run (all at once, map.mrc last: `StagedOutputs`) and
    return its summary. InputError, with nothing written, if the run diverged.

    volume: (N, N, N) final map, or (K, N, N, N) with classes (map.mrc is then the largest
    class), in the run's dtype and device; info: what config.json holds (see `run_info`);
    command: what report.html calls the run. With several ranks, all score the particles and
    rank 0 alone writes; every rank returns once the files are there.
    """
    poses = None
    if run.config.write_poses or volume.dim() == 4:
        poses = assign_poses(run, volume, noise_precision, class_log_weights, world)
    check_finite_result(run, volume.detach(), poses, metrics)
    world.check_same(volume, "final maps")
    return world.on_main(lambda: _write_outputs(
        out, run, volume, metrics, poses, gradient_evaluations=gradient_evaluations,
        seconds=seconds, info=info | {"world_size": world.size}, title=title,
        command=command))


def _write_outputs(out: Path, run: PreparedRun, volume: Tensor, metrics: list[dict],
                   poses: PoseAssignment | None, *, gradient_evaluations: int, seconds: float,
                   info: dict, title: str, command: str) -> ReconstructionResult:
    """`finish`'s files (see there)."""
    from cryostoch.engine.html_report import (
        REPORT_HTML,
        reconstruction_report_html,
        write_report_html,
    )
    from cryostoch.evaluate.plots import reconstruction_report

    radius = reached_cutoff_radius_px(run, metrics)
    all_maps = band_limited(volume.detach().float().cpu(), run, radius)
    info = info | {"map_low_pass_a": run.geometry.resolution_a(radius),
                   "map_low_pass_edge_px": OUTPUT_LOW_PASS_EDGE_PX}
    map_volume = all_maps
    class_maps: list[ViewedMap] = []
    with StagedOutputs(out) as staged:
        if volume.dim() == 4:
            info = info | write_class_maps(staged, run, all_maps, poses.classes)
            map_volume = all_maps[info["classes"][0]["class"] - 1]
            class_maps = [ViewedMap(c["map"], all_maps[c["class"] - 1], run.geometry.pixel_size_a,
                                    f"class {c['class']}, {c['particles']} particles")
                          for c in sorted(info["classes"], key=lambda c: c["class"])]
        write_metrics(staged.path("metrics.csv"), metrics)
        if run.config.write_poses:
            write_poses(staged.path("poses.star"), run, poses)
        reconstruction_report(staged.path("report.png"), map_volume, metrics, title=title)
        staged.path("config.json").write_text(json.dumps(info, indent=2, default=str))
        write_report_html(staged.path(REPORT_HTML), reconstruction_report_html(
            run, map_volume, metrics, info, poses, command=command, seconds=seconds,
            gradient_evaluations=gradient_evaluations,
            class_maps=[(f"class {c + 1}", all_maps[c]) for c in range(len(class_maps))]))
        script = staged.path(CHIMERAX_SCRIPT)  # asked for before map.mrc, which comes last
        maps = write_maps(staged, run, map_volume)
        if class_maps:
            maps[0] = dataclasses.replace(maps[0], what="the largest class")
        write_chimerax_script(script, maps + class_maps, mass_kda=run.config.mass_kda,
                              particle_diameter_a=2 * run.geometry.particle_radius_px
                              * run.geometry.pixel_size_a)
    final = next((m["test_nll"] for m in reversed(metrics) if m["test_nll"] is not None), None)
    return ReconstructionResult(out, out / "map.mrc", map_volume, final, gradient_evaluations,
                                seconds, metrics)
