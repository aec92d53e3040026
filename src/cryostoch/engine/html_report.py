"""report.html of a run folder: the run's data gathered into one self-contained page.

`reconstruct` and `baseline` (through `outputs.finish`) and `refine` (`refine_run._finish`)
write it among their staged outputs, before map.mrc. The page: a header (command, particles,
box, pixel size, timings, versions, the settings), isosurfaces of the map seen along x, y and
z at the level `evaluate.shape.surface_level` chooses (as open_in_chimerax.cxc does) with
central slices and projections, then what the run measured: for reconstruct the held-out NLL
and objective curves, class sizes and maps, the noise spectrum, the posterior confidence and
viewing directions of the particles' best poses; for refine the per-iteration table, the FSC
curves, the Guinier plot and the viewing directions. The figures come from `evaluate`
(render, plots, report_figures, postprocess_output), the HTML from `evaluate.report_html`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from cryostoch import __version__
from cryostoch.evaluate.plots import convergence_figure, map_views_figure
from cryostoch.evaluate.render import figure_png, isosurface_figure
from cryostoch.evaluate.report_figures import (
    class_sizes_figure,
    confidence_figure,
    noise_spectrum_figure,
    viewing_directions_figure,
)
from cryostoch.evaluate.report_html import (
    PageFigure,
    figure_html,
    key_value_html,
    note_html,
    page_html,
    section_html,
    settings_html,
    table_html,
)
from cryostoch.evaluate.shape import surface_level
from cryostoch.io._common import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from cryostoch.engine.outputs import PoseAssignment
    from cryostoch.engine.prepare import PreparedRun
    from cryostoch.engine.refine import RefineState
    from cryostoch.evaluate.postprocess import PostprocessResult

REPORT_HTML = "report.html"
# metrics.csv columns of refine shown in the per-iteration table, with their headings
REFINE_COLUMNS = {
    "iteration": "iteration", "search_resolution_a": "search cutoff (A)",
    "angular_step_deg": "angular step (deg)", "shift_step_px": "shift step (px)",
    "resolution_0143_a": "FSC 0.143 (A)", "resolution_05_a": "FSC 0.5 (A)",
    "mean_rotation_change_deg": "poses moved (deg)",
    "mean_max_probability": "mean best-pose probability",
    "window_edge_mass": "posterior on window edge", "seconds": "seconds",
}


@dataclass(frozen=True)
class RunHeader:
    """What the page's header says about a run."""

    command: str
    particles: str
    n_particles: int
    box_size: int
    pixel_size_a: float
    settings: dict
    timings: dict
    details: dict = field(default_factory=dict)  # more name / value lines (working box...)


def header_section(header: RunHeader) -> str:
    facts = {"command": header.command, "particles file": header.particles,
             "particles": header.n_particles, "box": f"{header.box_size} px",
             "pixel size": f"{header.pixel_size_a:.4g} A"} | header.details
    facts["cryostoch version"] = __version__
    return section_html(
        "Run", '<div class="cols">', key_value_html(facts), key_value_html(header.timings),
        "</div>", "<details open><summary>settings</summary>",
        settings_html(header.settings), "</details>")


def map_section(volume: Tensor, pixel_size_a: float, *, particle_diameter_a: float,
                mass_kda: float | None, what: str) -> str:
    """Isosurfaces along x, y, z at `surface_level`, then central slices and projections."""
    level, rule = surface_level(volume, pixel_size_a, particle_diameter_a=particle_diameter_a,
                                mass_kda=mass_kda)
    iso = PageFigure("isosurfaces", figure_png(isosurface_figure([volume], [level])),
                     f"{what}: surface at level {level:.4g}, the level that {rule} (as "
                     "open_in_chimerax.cxc); orthographic views along x, y and z, oriented as the "
                     "slices below (along z: x to the right, y up)")
    views = PageFigure("slices_projections", figure_png(map_views_figure(volume)),
                       f"{what}: central slices (top) and projections (bottom) along z, y, x")
    return section_html("Map", figure_html(iso), figure_html(views))


def poses_section(euler_deg: np.ndarray | None, probability: np.ndarray | None,
                  what: str, *, missing: str = "no poses were assigned") -> str:
    """Viewing directions of the particles' poses (rot, tilt) and, when known, the
    histogram of their best pose's posterior probability; `missing` says why there are no
    poses when `euler_deg` is None."""
    parts = []
    if euler_deg is None:
        parts.append(note_html(missing))
    else:
        parts.append(figure_html(PageFigure(
            "viewing_directions",
            figure_png(viewing_directions_figure(euler_deg[:, 0], euler_deg[:, 1])),
            f"viewing directions (rot, tilt) of {what}, equal-area bins on a Mollweide map")))
    if probability is not None:
        parts.append(figure_html(PageFigure(
            "confidence", figure_png(confidence_figure(probability)),
            "each particle's posterior probability of its most probable pose (as "
            "rlnMaxValueProbDistribution in poses.star)")))
    return section_html("Particles", *parts)


def write_report_html(path: Path, text: str) -> None:
    """Write the page atomically (a staged output's path, or the run folder's report.html)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _built_note(started: float) -> str:
    return note_html(f"page built by cryostoch {__version__} in "
                     f"{time.perf_counter() - started:.1f} s; self-contained (images embedded)")


# ------------------------------------------------------------------ reconstruct, baseline
def reconstruction_header(run: PreparedRun, info: dict, metrics: Sequence[dict], *,
                          command: str, seconds: float, gradient_evaluations: int) -> RunHeader:
    geometry, dataset = run.geometry, run.dataset
    split = info.get("particles", {})
    details = {"working box": f"{geometry.box_size} px at {geometry.pixel_size_a:.4g} A",
               "cutoff": f"{geometry.cutoff_resolution_a:.1f} A "
                         f"({geometry.cutoff_radius_px:.1f} Fourier px)",
               "train / held out": f"{split.get('train')} / {split.get('test')}",
               "noise model": info.get("noise_model"), "mask": info.get("mask")}
    last = metrics[-1] if metrics else {}
    final_nll = next((m["test_nll"] for m in reversed(metrics)
                      if m.get("test_nll") is not None), None)
    timings = {"wall time": f"{seconds:.3g} s", "iterations": last.get("iteration"),
               "epochs": last.get("epoch"), "gradient evaluations": gradient_evaluations,
               "final held-out NLL per image": final_nll,
               "versions": ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())}
    return RunHeader(command, str(run.config.particles), len(run.particles), dataset.box_size,
                     dataset.pixel_size_a, info.get("config", {}), timings, details)


def classes_section(class_maps: Sequence[tuple[str, Tensor]], sizes: Sequence[int],
                    pixel_size_a: float, *, particle_diameter_a: float,
                    mass_kda: float | None) -> str:
    """Class sizes and every class's isosurfaces (one row per class, each at its own level)."""
    labels = [label for label, _ in class_maps]
    volumes = [v for _, v in class_maps]
    levels = [surface_level(v, pixel_size_a, particle_diameter_a=particle_diameter_a,
                            mass_kda=mass_kda)[0] for v in volumes]
    return section_html(
        "Classes",
        figure_html(PageFigure("class_sizes", figure_png(class_sizes_figure(sizes, labels)),
                               "particles per class (each particle's most probable class)")),
        figure_html(PageFigure("class_isosurfaces",
                               figure_png(isosurface_figure(volumes, levels, labels=labels)),
                               "every class at the level of the same rule as the map")))


def noise_section(info: dict, box_size: int, pixel_size_a: float) -> str:
    variance = info.get("noise_variance_per_shell")
    if not variance:
        return section_html("Noise", note_html("white noise model: no spectrum recorded"))
    return section_html("Noise", figure_html(PageFigure(
        "noise_spectrum", figure_png(noise_spectrum_figure(np.asarray(variance), box_size,
                                                           pixel_size_a)),
        "the noise variance per Fourier shell of the working box at the end of the run "
        "(config.json: noise_variance_per_shell)")))


def reconstruction_report_html(run: PreparedRun, volume: Tensor, metrics: Sequence[dict],
                               info: dict, poses: PoseAssignment | None, *, command: str,
                               seconds: float, gradient_evaluations: int,
                               class_maps: Sequence[tuple[str, Tensor]] = (),
                               in_progress: bool = False) -> str:
    """The page of a reconstruct or baseline run: `volume` (N, N, N) is map.mrc, `class_maps`
    (label, (N, N, N)) every class when there are several (sizes from `info["classes"]`).
    `in_progress`: the page of a checkpoint (the current map; poses come at the end)."""
    started = time.perf_counter()
    geometry = run.geometry
    diameter = 2 * geometry.particle_radius_px * geometry.pixel_size_a
    header = reconstruction_header(run, info, metrics, command=command, seconds=seconds,
                                   gradient_evaluations=gradient_evaluations)
    sections = [header_section(header),
                map_section(volume, geometry.pixel_size_a, particle_diameter_a=diameter,
                            mass_kda=run.config.mass_kda, what="map.mrc"),
                section_html("Convergence", figure_html(PageFigure(
                    "convergence", figure_png(convergence_figure(metrics)),
                    "held-out NLL per image (final cutoff) and the minibatch objective (at "
                    "each stage's cutoff; dashed: frequency-marching stage changes) against "
                    "single-image gradient evaluations")))]
    if class_maps:
        by_class = {c["class"]: c["particles"] for c in info.get("classes", [])}
        sizes = [by_class.get(k + 1, 0) for k in range(len(class_maps))]
        sections.append(classes_section(class_maps, sizes, geometry.pixel_size_a,
                                        particle_diameter_a=diameter,
                                        mass_kda=run.config.mass_kda))
    sections.append(noise_section(info, geometry.box_size, geometry.pixel_size_a))
    euler = probability = None
    if poses is not None:
        euler = run.model.pose_parameters(poses.best_pose_index)[0].cpu().double().numpy()
        probability = poses.probability.numpy()
    missing = ("in progress: the poses are assigned when the run ends" if in_progress
               else "no poses were assigned (write_poses off, as in the paper study's runs)")
    sections.append(poses_section(euler, probability, "every particle's most probable pose",
                                  missing=missing))
    sections.append(_built_note(started))
    subtitle = f"{Path(run.config.particles).name} -> {run.config.out_dir}"
    if in_progress:
        subtitle += (f"; in progress: written at the checkpoint after "
                     f"{gradient_evaluations} gradient evaluations, the current map")
    return page_html(f"cryostoch {command}", subtitle, sections)


# ------------------------------------------------------------------ refine
def refine_report_html(run: PreparedRun, state: RefineState, post: PostprocessResult,
                       record: dict) -> str:
    """The page of a refine run: `record` is refine.json, `post` the post-processing."""
    from cryostoch.evaluate.postprocess_output import guinier_figure, postprocess_fsc_figure
    from cryostoch.geometry.rotations import matrix_to_euler

    started = time.perf_counter()
    geometry, dataset = run.geometry, run.dataset
    pixel = geometry.pixel_size_a
    history = record.get("history", [])
    timings = {"wall time": f"{record['seconds']:.3g} s", "iterations": record["iterations"],
               "seconds per iteration": [round(h["seconds"], 1) for h in history]}
    results = {f"resolution (A), FSC 0.143 ({post.final_curve_name})": post.resolution_a,
               "resolution (A), FSC 0.5": post.resolution_05_a,
               "resolution (A), masked corrected FSC 0.143": post.resolution_corrected_a,
               "resolution (A), unmasked FSC 0.143": record.get("resolution_unmasked_a"),
               "post-processing warnings": "; ".join(post.warnings) or "none",
               "B-factor applied (A^2)": post.bfactor}
    limits = record.get("box_limits")
    if limits:
        def resolution(value_a: float | None) -> str:  # None: nothing kept (infinite)
            return "no resolution" if value_a is None else f"{value_a:.3g} A"

        results["the whole particle's signal in the box (median defocus) up to"] = resolution(
            limits["particle_inside_a"])
        results["the CTF aliased in the box (median defocus) beyond"] = resolution(
            limits["aliasing_a"])
    header = RunHeader("cryostoch refine", str(run.config.particles), record["n_particles"],
                       dataset.box_size, dataset.pixel_size_a, record["config"], timings,
                       results)
    rows = [[h.get(k) for k in REFINE_COLUMNS] for h in history]
    euler = matrix_to_euler(state.rotations).double().numpy()
    sections = [
        header_section(header),
        map_section(post.map_sharpened, pixel,
                    particle_diameter_a=2 * geometry.particle_radius_px * pixel, mass_kda=None,
                    what="map.mrc (post-processed)"),
        section_html("Iterations", table_html(list(REFINE_COLUMNS.values()), rows),
                     note_html("metrics.csv: the FSC of each iteration is that of the half maps "
                               "inside the particle's sphere, before post-processing")),
        section_html("Resolution", figure_html(PageFigure(
            "fsc", figure_png(postprocess_fsc_figure(post)),
            "gold-standard FSC of the half maps: unmasked, masked, phase-randomised and "
            "corrected (fsc.csv), with the 0.5 and 0.143 thresholds")),
            figure_html(PageFigure("guinier", figure_png(guinier_figure(post)),
                                   "Guinier plot (guinier.png)"))),
        poses_section(euler, None, "every particle's refined pose"),
        _built_note(started)]
    return page_html("cryostoch refine", f"{Path(run.config.particles).name} -> "
                     f"{run.config.out_dir}", sections)


__all__ = ["REPORT_HTML", "RunHeader", "reconstruction_report_html", "refine_report_html",
           "write_report_html"]


# ------------------------------------------------------------------------------ experiment
def experiment_report_html(out: Path, sections: Sequence[dict], settings: dict,
                           timing: str) -> str:
    """The study's page: its settings and timing, then per data set (a dict with name, folder,
    figures (file names in the folder) and table (rows of method results)) the figures
    embedded, the table, and links to each method run's own report.html."""
    started = time.perf_counter()
    parts = [section_html("Run", note_html(timing), settings_html(settings))]
    for section in sections:
        folder = out / section["folder"]
        figures = [PageFigure(name, (folder / name).read_bytes(), name)
                   for name in section["figures"] if (folder / name).exists()]
        rows = section["table"]
        header = list(rows[0]) + ["report"] if rows else []
        body = [[row.get(key) for key in header[:-1]]
                + [f"{section['folder']}/{row['method']}/report.html"] for row in rows]
        used = [note_html(section["particles"])] if section.get("particles") else []
        parts.append(section_html(section["name"], *used, *(figure_html(f) for f in figures),
                                  table_html(header, body),
                                  note_html("each method's own page (report.html) lies in its "
                                            "folder, as the last column says")))
    parts.append(_built_note(started))
    return page_html("cryostoch experiment paper", str(out), parts)
