"""The paper's study (section 4, Figs. 3, 4 and 6), reproducible with one command.

For each data set (the synthetic phantom set and, when available, real beta-galactosidase
particles) every optimiser runs from the same random initial density, sees the images in the
same seeded order, and gets the same budget of single-image gradient evaluations (so online
L-BFGS and Hessian-free take fewer steps). The eight paper runs use the paper's plain methods
(no preconditioner, no frequency marching, no tempering; step sizes from the measured curvature
instead of hand tuning); one more run, "cryostoch", uses this package's defaults. The two
baselines (iterative projection matching, batch EM) run 5 iterations from the same start.
Outputs: `report.md` with figures (test NLL against gradient evaluations with a zoom, map
snapshots at 5K and 50K gradient evaluations and at the end, the baselines against one epoch of
SGD) and a table (final test NLL, resolution of the aligned FSC to the ground truth, wall time,
gradient evaluations). `--scale` shrinks the synthetic set (and the snapshot counts) for CI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cryostoch.engine.baseline import BaselineConfig, run_baseline
from cryostoch.engine.config import OPTIMIZER_NAMES, ReconstructionConfig
from cryostoch.engine.reconstruct import reconstruct
from cryostoch.evaluate.align import align_maps, apply_alignment
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.evaluate.plots import map_gallery
from cryostoch.io.mrc import read_map
from cryostoch.simulate.run import SimulationConfig, simulate_dataset

log = logging.getLogger(__name__)

SHARED = Path("..") / "shared" / "data"
PAPER_PARTICLES = 50_000


@dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str
    scale: float = 1.0
    epochs: float = 10.0
    box_size: int = 128
    pixel_size_a: float = 2.8
    snr: float = 0.05
    synthetic_max_freq: float = 0.10
    real_max_freq: float = 0.16
    real_shift_range_a: float = 10.0
    real_max_particles: int | None = None
    ctf_table: str | None = str(SHARED / "ctf" / "empiar10049_ctf.star")
    real_particles: str | None = str(
        SHARED / "betagal_empiar10204" / "Extract" / "job009" / "particles.star")
    optimizers: tuple[str, ...] = OPTIMIZER_NAMES
    baseline_iterations: int = 5
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError("scale must be in (0, 1]")
        if not self.epochs > 0:
            raise ValueError("epochs must be positive")
        unknown = set(self.optimizers) - set(OPTIMIZER_NAMES)
        if unknown:
            raise ValueError(f"unknown optimizers: {', '.join(sorted(unknown))}")

    @property
    def n_synthetic(self) -> int:
        return max(400, int(round(PAPER_PARTICLES * self.scale)))


@dataclass
class MethodRun:
    name: str
    out_dir: Path
    metrics: list[dict]
    volume: torch.Tensor
    seconds: float
    gradient_evaluations: int
    final_test_nll: float | None


def _run_methods(config: ExperimentConfig, particles: Path, out: Path, *, max_freq: float,
                 shift_range_a: float, snapshot_counts: tuple[int, ...], n_train: int,
                 progress: bool) -> list[MethodRun]:
    budget = int(config.epochs * n_train)
    runs: list[MethodRun] = []
    base = ReconstructionConfig(
        particles=str(particles), out_dir="", epochs=config.epochs, max_freq=max_freq,
        seed=config.seed, device=config.device, shift_range_a=shift_range_a,
        snapshots=snapshot_counts + (n_train,), gradient_budget=budget, write_poses=False,
    )
    plan = [(name, dataclasses.replace(base, optimizer=name).paper_faithful())
            for name in config.optimizers]
    plan.append(("cryostoch", dataclasses.replace(base, optimizer="sgd")))
    for name, cfg in plan:
        cfg = dataclasses.replace(cfg, out_dir=str(out / name))
        log.info("%s: %s", out.name, name)
        start = time.perf_counter()
        result = reconstruct(cfg, progress=progress)
        runs.append(MethodRun(name, Path(cfg.out_dir), result.metrics, result.volume,
                              time.perf_counter() - start, result.gradient_evaluations,
                              result.final_test_nll))
    for method in ("projmatch", "em"):
        # the paper-faithful settings give the baselines exactly the paper runs' start
        cfg = dataclasses.replace(base.paper_faithful(), out_dir=str(out / method),
                                  snapshots=(), gradient_budget=None)
        log.info("%s: %s", out.name, method)
        start = time.perf_counter()
        result = run_baseline(BaselineConfig(method=method, reconstruction=cfg,
                                             iterations=config.baseline_iterations),
                              progress=progress)
        runs.append(MethodRun(method, Path(cfg.out_dir), result.metrics, result.volume,
                              time.perf_counter() - start, result.gradient_evaluations,
                              result.final_test_nll))
    return runs


def _nll_figure(path: Path, runs: list[MethodRun], title: str) -> None:
    from cryostoch.evaluate.plots import _pyplot

    plt = _pyplot()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    finals = []
    for run in runs:
        points = [(m["gradient_evaluations"], m["test_nll"]) for m in run.metrics
                  if m.get("test_nll") is not None]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        style = "--" if run.name in ("projmatch", "em") else "-"
        for a in (ax, zoom):
            a.plot([max(v, 1) for v in x], y, style, marker=".", ms=3, lw=1.2, label=run.name)
        finals.append(y[-1])
        tail = [v for v, g in zip(y, x, strict=True) if g >= 0.5 * x[-1]]
        finals.extend(tail)
    ax.set_xscale("log")
    ax.set_xlabel("gradient evaluations (single images)")
    ax.set_ylabel("held-out negative log-likelihood per image")
    ax.set_title(title)
    ax.legend(fontsize=8)
    zoom.set_xscale("log")
    if finals:
        low = min(finals)
        zoom.set_ylim(low - 1, low + 15)
        xmax = max(m["gradient_evaluations"] for r in runs for m in r.metrics)
        zoom.set_xlim(max(1, xmax / 10), xmax * 1.1)
    zoom.set_title("zoom on the end")
    zoom.set_xlabel("gradient evaluations")
    for a in (ax, zoom):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _snapshot(run: MethodRun, count: int) -> torch.Tensor | None:
    path = run.out_dir / "snapshots" / f"map_{count:09d}.mrc"
    if path.exists():
        return read_map(path)[0]
    return None


def _study(config: ExperimentConfig, name: str, particles: Path, out: Path, *,
           truth: torch.Tensor | None, pixel: float, max_freq: float, shift_range_a: float,
           n_train: int, progress: bool) -> dict:
    snapshot_counts = tuple(max(1, int(round(c * config.scale))) for c in (5_000, 50_000))
    runs = _run_methods(config, particles, out, max_freq=max_freq, shift_range_a=shift_range_a,
                        snapshot_counts=snapshot_counts, n_train=n_train, progress=progress)
    _nll_figure(out / "fig3_test_nll.png", runs, f"{name}: held-out NLL")
    reference = truth if truth is not None else next(r.volume for r in runs if r.name == "sgd")
    # One alignment per run (its final map onto the reference), reused for its snapshots.
    alignments = {r.name: align_maps(reference, r.volume, pixel_size_a=pixel) for r in runs}

    def aligned(run: MethodRun, volume: torch.Tensor | None) -> torch.Tensor | None:
        return None if volume is None else apply_alignment(volume, alignments[run.name])

    stochastic = [r for r in runs if r.name not in ("projmatch", "em")]
    columns = [f"{c} grads" for c in snapshot_counts] + ["end"]
    rows = [[aligned(r, _snapshot(r, c)) for c in snapshot_counts] + [aligned(r, r.volume)]
            for r in stochastic]
    map_gallery(out / "fig4_maps.png", rows, [r.name for r in stochastic], columns)
    by_name = {r.name: r for r in runs}
    sgd = by_name.get("sgd", by_name["cryostoch"])
    fig6 = [[aligned(by_name[m], by_name[m].volume) for m in ("projmatch", "em")]
            + [aligned(sgd, _snapshot(sgd, n_train))]]
    map_gallery(out / "fig6_baselines.png", fig6, [""],
                [f"projection matching, {config.baseline_iterations} it.",
                 f"batch EM, {config.baseline_iterations} it.", f"{sgd.name}, 1 epoch"])
    table = []
    for r in runs:
        row = {"method": r.name, "final_test_nll": r.final_test_nll,
               "gradient_evaluations": r.gradient_evaluations, "seconds": round(r.seconds, 1)}
        if truth is not None:
            fsc = compute_fsc(truth, aligned(r, r.volume), pixel_size_a=pixel)
            row["fsc_0.5_a"] = round(fsc.resolution_at(0.5), 1)
        table.append(row)
    return {"name": name, "table": table, "figures": ["fig3_test_nll.png", "fig4_maps.png",
                                                      "fig6_baselines.png"]}


def _markdown(sections: list[dict], config: ExperimentConfig, seconds: float) -> str:
    lines = ["# The paper's study, reproduced by cryostoch", "",
             f"Scale {config.scale} ({config.n_synthetic} synthetic particles), "
             f"{config.epochs:g} epochs of gradient evaluations per method, seed {config.seed}; "
             f"total wall time {seconds / 60:.1f} min on {torch.get_num_threads()} threads.", "",
             "Paper methods: plain updates (no preconditioner, marching or tempering), step sizes "
             "from the measured curvature. `cryostoch`: SGD with this package's defaults. "
             "`projmatch`, `em`: the baselines, one iteration = one epoch of gradient "
             "evaluations.", ""]
    for section in sections:
        lines += [f"## {section['name']}", ""]
        for fig in section["figures"]:
            lines += [f"![{fig}]({section['folder']}/{fig})", ""]
        keys = list(section["table"][0])
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in section["table"]:
            cells = []
            for k in keys:
                v = row.get(k)
                cells.append("" if v is None else (f"{v:.2f}" if isinstance(v, float)
                                                   and k == "final_test_nll" else str(v)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_experiment(config: ExperimentConfig, *, progress: bool = True) -> Path:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections = []
    table = config.ctf_table if config.ctf_table and Path(config.ctf_table).exists() else None
    simulation = simulate_dataset(
        SimulationConfig(source="phantom", n_particles=config.n_synthetic,
                         box_size=config.box_size, pixel_size_a=config.pixel_size_a,
                         out_dir=str(out / "synthetic" / "data"), ctf_table=table,
                         snr=config.snr, seed=config.seed, overwrite=True),
        progress=progress,
    )
    truth, pixel = read_map(simulation.ground_truth_path)
    n_train = config.n_synthetic - 100
    section = _study(config, "synthetic", simulation.star_path, out / "synthetic", truth=truth,
                     pixel=pixel, max_freq=config.synthetic_max_freq, shift_range_a=0.0,
                     n_train=n_train, progress=progress)
    section["folder"] = "synthetic"
    sections.append(section)
    if config.real_particles and Path(config.real_particles).exists():
        from cryostoch.io.dataset import open_particles

        real = open_particles(config.real_particles)
        real_path = Path(config.real_particles)
        if config.real_max_particles and len(real) > config.real_max_particles:
            # a seeded random subset, written with absolute stack paths (for quick runs)
            from cryostoch.io.star import write_particles_star

            g = torch.Generator().manual_seed(config.seed)
            rows = torch.randperm(len(real), generator=g)[: config.real_max_particles]
            real = real.subset(rows.sort().values.numpy())
            real_path = out / "real" / "subset.star"
            real_path.parent.mkdir(parents=True, exist_ok=True)
            write_particles_star(real_path, *real.relion_tables())
        n_real, real_pixel = len(real), real.pixel_size_a
        section = _study(config, "real: beta-galactosidase (EMPIAR-10204)",
                         real_path, out / "real", truth=None, pixel=real_pixel,
                         max_freq=config.real_max_freq, shift_range_a=config.real_shift_range_a,
                         n_train=n_real - 100, progress=progress)
        section["folder"] = "real"
        sections.append(section)
    else:
        log.warning("real particles not found (%s): synthetic study only", config.real_particles)
    seconds = time.perf_counter() - start
    report = out / "report.md"
    report.write_text(_markdown(sections, config, seconds))
    (out / "summary.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "seconds": seconds, "sections": sections},
        indent=2, default=str))
    return report


__all__ = ["ExperimentConfig", "run_experiment"]
