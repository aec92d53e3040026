"""The paper's study (section 4, Figs. 3, 4 and 6), reproducible with one command.

For each data set (the synthetic phantom set and, when available, real beta-galactosidase
particles) every optimiser runs from the same random initial density, sees the images in the
same seeded order, and gets the same budget of single-image gradient evaluations (so online
L-BFGS and Hessian-free take fewer steps). The eight paper runs use the paper's plain methods
(no preconditioner, no frequency marching, no tempering), each base rate tuned as the paper did,
on a subset of the training images (experiment_tuning.py; or, with `tuning=None`, the rate
calibrated from the measured curvature); any `torch.optim.Optimizer` subclass given by import
path runs beside them the same way (experiment_runs.py); one more run, "cryostoch", uses this
package's defaults. The two baselines (iterative projection matching, batch EM) run 5 iterations
from the same start. Outputs: `report.md` with figures (test NLL against gradient evaluations
with a zoom; map snapshots at 5K and 50K gradient evaluations and at the end, and the baselines
against one epoch of SGD, each map as three projections aligned onto the truth, the truth beside
them) and a table (final test NLL, resolution of the aligned FSC to the ground truth, wall time,
gradient evaluations). `--scale` shrinks both data sets (and the snapshot counts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cryostoch.engine.config import OPTIMIZER_NAMES, ReconstructionConfig
from cryostoch.engine.experiment_figures import (
    ONE_EPOCH_KEY,
    fsc_columns,
    map_figures,
    save_figure,
)
from cryostoch.engine.experiment_runs import (
    RUN_RECORD,
    MethodRun,
    external_optimizers,
    method_name,
    method_plan,
    read_json,
    run_methods,
    settings_json,
)
from cryostoch.engine.experiment_tuning import StudyTuning, tuned_plan, tuning_markdown
from cryostoch.engine.html_report import REPORT_HTML, experiment_report_html, write_report_html
from cryostoch.engine.reference_data import BETAGAL_PARTICLES, CTF_TABLE, reference_file
from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path
from cryostoch.io.mrc import read_map
from cryostoch.optim.external import load_optimizer_class
from cryostoch.simulate.run import (
    GROUND_TRUTH_NAME,
    STAR_NAME,
    SUMMARY_NAME,
    SimulationConfig,
    simulate_dataset,
)

log = logging.getLogger(__name__)

PAPER_PARTICLES = 50_000
# The criterion: a method "reaches the structure" when its aligned FSC against the
# truth falls to 0.5 at most this many times the cutoff resolution
CRITERION_FACTOR = 1.3
# The fewest real particles a scaled study uses: 400 train beside the 100 held out. The real
# part of `--scale 0.02` then took 3.6 min here (README); all 2,374 particles, 5.7x the
# gradient evaluations, took an estimated 14 min of a 24-min quick look
MIN_REAL_PARTICLES = 500


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
    # None: the reference data's (real EMPIAR-10049 CTFs; real EMPIAR-10204 particles) when
    # found, else built-in CTF defaults and no real study; "none" skips the real study.
    ctf_table: str | None = None
    real_particles: str | None = None
    optimizers: tuple[str, ...] = OPTIMIZER_NAMES
    baseline_iterations: int = 5
    # None: every method's calibrated rate as it is (no tuning)
    tuning: StudyTuning | None = StudyTuning()
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError("scale must be in (0, 1]")
        if not self.epochs > 0:
            raise ValueError("epochs must be positive")
        if self.box_size < 16 or self.box_size % 2:
            raise ValueError(f"box must be an even number >= 16, got {self.box_size}")
        if self.real_max_particles is not None and self.real_max_particles < 200:
            raise ValueError("real-max-particles must be >= 200 (100 are held out)")
        if self.baseline_iterations < 1:
            raise ValueError("baseline-iterations must be >= 1")
        if not self.optimizers:
            raise ValueError("give at least one optimizer")
        unknown = set(self.optimizers) - set(OPTIMIZER_NAMES) - set(self.external_optimizers)
        if unknown:
            raise ValueError(f"unknown optimizers: {', '.join(sorted(unknown))} (give the "
                             f"paper's {', '.join(OPTIMIZER_NAMES)} or a torch.optim.Optimizer "
                             "subclass as package.module:Class)")
        for path in self.external_optimizers:
            load_optimizer_class(path)  # ValueError (one line) if it cannot be imported
        names = [method_name(o) for o in self.optimizers]
        if len(set(names)) < len(names):
            raise ValueError(f"an optimizer is given twice: {', '.join(self.optimizers)}")
        for name, path in (("ctf-table", self.ctf_table), ("real-particles", self.real_particles)):
            if path not in (None, "none") and not Path(path).is_file():
                raise ValueError(f"{name}: {path} does not exist")

    @property
    def external_optimizers(self) -> list[str]:
        """The optimisers given by import path (``package.module:Class``)."""
        return external_optimizers(self.optimizers)

    def resolved_ctf_table(self) -> str | None:
        return _resolve(self.ctf_table, CTF_TABLE, "no real CTF table: built-in CTF defaults")

    def resolved_real_particles(self) -> str | None:
        return _resolve(self.real_particles, BETAGAL_PARTICLES,
                        "no real particles: synthetic study only")

    @property
    def n_synthetic(self) -> int:
        return max(400, int(round(PAPER_PARTICLES * self.scale)))

    def n_real(self, available: int) -> int:
        """Real particles used: `real_max_particles` if given, else the same share as the
        synthetic set's (at least 500, so 400 train beside the 100 held out); all at scale 1."""
        cap = self.real_max_particles
        if cap is None:
            cap = max(MIN_REAL_PARTICLES, int(round(available * self.scale)))
        return min(available, cap)


def _resolve(given: str | None, reference: tuple[str, ...], missing: str) -> str | None:
    """A given path as it is, "none" as None, None as the reference data's file if found."""
    if given is None:
        found = reference_file(*reference)
        if found is None:
            log.warning(missing)
        return None if found is None else str(found)
    return None if given == "none" else given


def _study(config: ExperimentConfig, name: str, particles: Path, out: Path, *,
           truth: torch.Tensor | None, pixel: float, max_freq: float, shift_range_a: float,
           n_train: int, progress: bool, resume: bool) -> dict:
    snapshot_counts = tuple(max(1, int(round(c * config.scale))) for c in (5_000, 50_000))
    base = ReconstructionConfig(
        particles=str(particles), out_dir="", epochs=config.epochs, max_freq=max_freq,
        seed=config.seed, device=config.device, shift_range_a=shift_range_a,
        snapshots=snapshot_counts + (n_train,), gradient_budget=int(config.epochs * n_train),
        write_poses=False)
    plan = method_plan(base, out, config.optimizers, config.baseline_iterations)
    tuning_rows: list[dict] = []
    if config.tuning is not None:
        plan, tuning_rows = tuned_plan(plan, config.tuning, out, n_train, progress=progress,
                                       resume=resume)
    runs = run_methods(plan, out, progress=progress, resume=resume)
    from cryostoch.evaluate.plots import nll_figure

    save_figure(nll_figure(runs, f"{name}: held-out NLL"), out / "fig3_test_nll.png")
    final_maps = map_figures(out, runs, truth, pixel, snapshot_counts, n_train,
                             config.baseline_iterations)
    table = []
    cutoff_a = 2 * pixel / max_freq
    for r in runs:
        row = {"method": r.name, "final_test_nll": r.final_test_nll,
               "gradient_evaluations": r.gradient_evaluations, "seconds": round(r.seconds, 1)}
        if truth is not None:
            row.update(fsc_columns(r, final_maps[r.name], truth, pixel, cutoff_a, n_train))
        table.append(row)
    return {"name": name, "table": table, "tuning": tuning_rows, "cutoff_a": cutoff_a,
            "lr_halvings": {r.name: r.lr_halvings for r in runs if r.lr_halvings},
            "figures": ["fig3_test_nll.png", "fig4_maps.png", "fig6_baselines.png"]}


def methods_reaching(table: list[dict], methods: tuple[str, ...],
                     key: str = "fsc_0.5_over_cutoff") -> list[str]:
    """The `methods` whose aligned FSC 0.5 against the truth (by default the final map's,
    with ONE_EPOCH_KEY the one-epoch snapshot's) lies within CRITERION_FACTOR times the
    cutoff resolution (the issue's "reach the structure")."""
    return [row["method"] for row in table if row["method"] in methods
            and row.get(key, float("inf")) <= CRITERION_FACTOR]


def _markdown(sections: list[dict], config: ExperimentConfig, seconds: float,
              compute_seconds: float, resumed: bool) -> str:
    timing = (f"this invocation took {seconds / 60:.1f} min (resumed); the simulation and the "
              f"method runs took {compute_seconds / 60:.1f} min in all" if resumed
              else f"total wall time {seconds / 60:.1f} min")
    lines = ["# The paper's study, reproduced by cryostoch", "",
             f"Scale {config.scale} ({config.n_synthetic} synthetic particles), "
             f"{config.epochs:g} epochs of gradient evaluations per method, seed {config.seed}; "
             f"{timing} on {torch.get_num_threads()} threads.", "",
             "Paper methods: plain updates (no preconditioner, marching or tempering), step sizes "
             + ("tuned on a subset (below). " if config.tuning is not None
                else "calibrated from the measured curvature (not tuned). ")
             + "`cryostoch`: SGD with this package's defaults (preconditioner, frequency "
             "marching, coloured noise, solvent mask); its held-out NLL is that of "
             "its own noise model, comparable with the others' only where the noise is white "
             "(the synthetic set). "
             "`projmatch`, `em`: the baselines, one iteration = one epoch of gradient "
             "evaluations. Fig. 4 and 6: projections along z, y and x of each map aligned "
             "onto the truth (real data: onto SGD's final map), the truth in the first row.",
             ""]
    external = [method_name(o) for o in config.external_optimizers]
    if external:
        lines += [f"External optimisers ({', '.join(external)}, given by import path): run as "
                  "`sgd` is, with the paper's plain updates, minibatch 100 (SGD's; the "
                  "paper's sizes name only its methods) and the learning rate 2 / L from the "
                  "measured curvature (optim/external.py).", ""]
    for section in sections:
        lines += [f"## {section['name']}", "", f"{section['particles']}.", ""]
        lines += tuning_markdown(section.get("tuning", []), config.tuning)
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
        if section.get("lr_halvings"):
            lines += ["Diverged over the whole run at the step chosen on the subset, and run "
                      "again from the start at a smaller one: " + ", ".join(
                          f"{m} (1/{2**h} of it)" for m, h in section["lr_halvings"].items())
                      + ".", ""]
        if "fsc_0.5_a" in keys:
            paper = tuple(m for m in OPTIMIZER_NAMES if m != "adam")  # the paper's seven
            ran = [m for m in paper if m in config.optimizers]
            reached = methods_reaching(section["table"], paper)
            lines += [f"Paper methods reaching FSC 0.5 within {CRITERION_FACTOR}x the cutoff "
                      f"({section['cutoff_a']:.0f} A): {len(reached)} of {len(ran)}"
                      f"{' (' + ', '.join(reached) + ')' if reached else ''}.", ""]
            early = methods_reaching(section["table"], paper, ONE_EPOCH_KEY)
            lines += [f"Within one epoch (the map after as many gradient evaluations as "
                      f"training images, aligned on its own): {len(early)} of {len(ran)}"
                      f"{' (' + ', '.join(early) + ')' if early else ''}.", ""]
    return "\n".join(lines)


SETTINGS_NAME = "experiment.json"  # report.md and report.html (REPORT_HTML) beside it
REPORT_NAME = "report.md"
SUMMARY_JSON = "summary.json"


def _check_settings(config: ExperimentConfig, out: Path, resume: bool) -> None:
    """Record the study's settings; on --resume, refuse a folder made with other settings.

    A fresh start forgets the records of earlier method runs, so that a later --resume never
    mixes them in."""
    path = out / SETTINGS_NAME
    current = settings_json(dataclasses.asdict(config))
    if resume and path.exists():
        saved = read_json(path)
        if saved is None:
            raise InputError(path, "is not a readable settings file; use another --out or "
                                   "start again without --resume")
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise InputError(path, f"was written with different settings ({', '.join(changed)})"
                                   "; use another --out or the same options to resume")
    if not resume:
        for record in out.glob(f"*/*/{RUN_RECORD}"):
            record.unlink()
    # an earlier report must not pass for this run's until this run writes its own
    for name in (REPORT_NAME, SUMMARY_JSON, REPORT_HTML):
        (out / name).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=2))


def _simulated_set(config: ExperimentConfig, out: Path, resume: bool,
                   progress: bool) -> tuple[Path, Path, float]:
    """(particles.star, ground_truth.mrc, seconds): simulated now, or on --resume reused when
    the folder holds a finished simulation with the same settings."""
    table = config.resolved_ctf_table()
    sim_config = SimulationConfig(
        source="phantom", n_particles=config.n_synthetic, box_size=config.box_size,
        pixel_size_a=config.pixel_size_a, out_dir=str(out / "synthetic" / "data"),
        ctf_table=table, snr=config.snr, seed=config.seed, overwrite=True)
    data = Path(sim_config.out_dir)
    summary = data / SUMMARY_NAME
    if resume and (data / STAR_NAME).exists():
        saved = read_json(summary) or {}
        if saved.get("config") == settings_json(dataclasses.asdict(sim_config)):
            log.info("synthetic data set in %s reused", data)
            return data / STAR_NAME, data / GROUND_TRUTH_NAME, 0.0
    result = simulate_dataset(sim_config, progress=progress)
    return result.star_path, result.ground_truth_path, result.seconds


def _real_subset(config: ExperimentConfig, real_particles: str, out: Path
                 ) -> tuple[Path, int, float, str]:
    """(STAR path, particles, pixel size, a sentence saying how many were used and why) of the
    real particles the study uses: all at scale 1, else a seeded random subset (`n_real`)
    written with absolute stack paths."""
    from cryostoch.io.dataset import open_particles

    real = open_particles(real_particles)
    available, n_used = len(real), config.n_real(len(real))
    if n_used == available:
        return Path(real_particles), available, real.pixel_size_a, \
            f"all {available} particles (100 held out)"
    from cryostoch.io.star import write_particles_star

    g = torch.Generator().manual_seed(config.seed)
    rows = torch.randperm(available, generator=g)[:n_used]
    real = real.subset(rows.sort().values.numpy())
    path = out / "real" / "subset.star"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_particles_star(path, *real.relion_tables())
    why = ("--real-max-particles" if config.real_max_particles is not None
           else f"--scale {config.scale:g} of them, at least {MIN_REAL_PARTICLES}")
    return path, n_used, real.pixel_size_a, \
        f"{n_used} of {available} particles ({why}; 100 held out), a seeded random subset"


def run_experiment(config: ExperimentConfig, *, progress: bool = True,
                   resume: bool = False) -> Path:
    """Run the study into `config.out_dir` and return the report's path.

    `resume`: reuse the simulated set and every method run that finished with the same
    settings, and continue an interrupted method run from its checkpoint.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(config, out, resume)
    start = time.perf_counter()
    sections = []
    star_path, truth_path, simulation_seconds = _simulated_set(config, out, resume, progress)
    truth, pixel = read_map(truth_path)
    n_train = config.n_synthetic - 100
    section = _study(config, "synthetic", star_path, out / "synthetic", truth=truth,
                     pixel=pixel, max_freq=config.synthetic_max_freq, shift_range_a=0.0,
                     n_train=n_train, progress=progress, resume=resume)
    section["folder"] = "synthetic"
    section["particles"] = (f"{config.n_synthetic} simulated particles ({n_train} training, "
                            "100 held out)")
    sections.append(section)
    real_particles = config.resolved_real_particles()
    if real_particles is not None:
        real_path, n_real, real_pixel, used = _real_subset(config, real_particles, out)
        log.info("real data: %s", used)
        section = _study(config, "real: beta-galactosidase (EMPIAR-10204)",
                         real_path, out / "real", truth=None, pixel=real_pixel,
                         max_freq=config.real_max_freq, shift_range_a=config.real_shift_range_a,
                         n_train=n_real - 100, progress=progress, resume=resume)
        section["folder"] = "real"
        section["particles"] = used
        sections.append(section)
    seconds = time.perf_counter() - start
    # with --resume, this invocation's wall time misses the earlier work: report both
    compute_seconds = simulation_seconds + sum(
        row["seconds"] for section in sections for row in section["table"])
    report = out / REPORT_NAME
    with atomic_path(out / SUMMARY_JSON) as tmp:
        tmp.write_text(json.dumps(
            {"config": dataclasses.asdict(config), "seconds": seconds,
             "method_and_simulation_seconds": compute_seconds, "resumed": resume,
             "sections": sections}, indent=2, default=str))
    with atomic_path(report) as tmp:
        tmp.write_text(_markdown(sections, config, seconds, compute_seconds, resume))
    timing = (f"{seconds / 60:.1f} min wall time; simulation and method runs "
              f"{compute_seconds / 60:.1f} min" + (" (resumed)" if resume else ""))
    write_report_html(out / REPORT_HTML, experiment_report_html(
        out, sections, settings_json(dataclasses.asdict(config)), timing))
    return report




__all__ = ["RUN_RECORD", "ExperimentConfig", "MethodRun", "run_experiment"]
