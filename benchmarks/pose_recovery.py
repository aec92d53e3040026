"""How well do refinement's global searches find simulated particles' true poses?

Example (the README's measurement on the simulated spike):
    python benchmarks/pose_recovery.py spike/particles.star spike/ground_truth.mrc \\
        --exhaustive-a 51,37,30 --pruned-a 37:25 --count 300

For each cutoff in --exhaustive-a, the exhaustive search (`engine/refine_data.top_poses`) of
the first --count particles against the true map low-passed to that cutoff; for each
COARSE:FINE pair in --pruned-a, the coarse-to-fine search of `refine --global-searches`
(`engine/refine_search.half_search`: the exhaustive search at COARSE keeps --top-k poses per
particle, re-scored at FINE against the unfiltered true map). Each found pose is compared with
the particle's simulated pose from the STAR file (an independent record): the share within one
and two grid steps of the exhaustive grid at COARSE (for the exhaustive search, also among its
--top-k best), the median angular and shift errors, and the seconds per particle, measured in
this run on this machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cryostoch.engine.checks import read_init_map
from cryostoch.engine.prepare import prepare_run
from cryostoch.engine.refine import Refinement
from cryostoch.engine.refine_data import (
    RefineConfig,
    coarse_steps,
    full_spectra,
    half_sets,
    top_poses,
)
from cryostoch.engine.refine_search import half_search
from cryostoch.evaluate.transform import soft_sphere_mask
from cryostoch.geometry.rotations import euler_to_matrix, geodesic_angle_rad


def prepared(star: str, truth: str, resolution_a: float, top_k: int):
    """The run (its model at `resolution_a`) and the true map scaled to the particles."""
    from cryostoch.engine.refine_data import start_map
    from cryostoch.fourier.resample import soft_low_pass

    config = RefineConfig(star, truth, "unused", initial_resolution_a=resolution_a,
                          global_top_k=top_k)
    run = prepare_run(config.search_config(), progress=False)
    if run.dataset.poses is None:
        raise SystemExit(f"{star}: no poses to compare with (a simulated set has them)")
    low = start_map(run, truth)  # low-passed and scaled to the particles' signal power
    raw = read_init_map(truth, run.dataset.box_size, run.dataset.pixel_size_a,
                        run.geometry.box_size, hint="the true map")
    raw_low = soft_low_pass(raw, run.geometry.cutoff_radius_px, 2.0, ndim=3)
    scale = float((low * raw_low).sum() / (raw_low * raw_low).sum())
    return config, run, raw * scale


def report(label: str, errors_deg: torch.Tensor, shift_errors: torch.Tensor, step_deg: float,
           seconds: float, n: int) -> None:
    """errors_deg: (n, K) against the truth, best first; shift_errors: (n,) of the best."""
    best = errors_deg[:, 0]
    line = (f"| {label} | {step_deg:.1f} | {(best < step_deg).double().mean():.0%} | "
            f"{(best < 2 * step_deg).double().mean():.0%} | ")
    line += (f"{(errors_deg < 2 * step_deg).any(1).double().mean():.0%} | "
             if errors_deg.shape[1] > 1 else "- | ")
    print(line + f"{best.median():.1f} | {shift_errors.median():.2f} | {seconds / n:.3f} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("particles", help="simulated STAR file (with the true poses)")
    parser.add_argument("truth", help="the true map (MRC)")
    parser.add_argument("--exhaustive-a", default="51,37,30",
                        help="cutoffs in A of exhaustive searches (comma-separated)")
    parser.add_argument("--pruned-a", default="37:25",
                        help="COARSE:FINE cutoff pairs in A of coarse-to-fine searches")
    parser.add_argument("--count", type=int, default=300, help="particles searched")
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    print(f"the first {args.count} particles of {args.particles}; top {args.top_k}; torch "
          f"threads {torch.get_num_threads()}")
    print("| search | step deg | best within 1 step | within 2 steps | any of top k within 2 "
          "steps | median error deg | median shift error px | s per particle |")
    print("|---|---|---|---|---|---|---|---|")
    searches = [(float(a), None) for a in args.exhaustive_a.split(",") if a] + [
        tuple(float(v) for v in pair.split(":")) for pair in args.pruned_a.split(",") if pair]
    for coarse_a, fine_a in searches:
        config, run, truth = prepared(args.particles, args.truth, coarse_a, args.top_k)
        rows = torch.arange(min(args.count, len(run.dataset)))
        poses = run.dataset.poses
        true_rot = euler_to_matrix(poses.euler_deg.double())[rows]
        true_shift = poses.shifts_px.double()[rows]
        radius = run.geometry.cutoff_radius_px
        step_deg = math.degrees(coarse_steps(run)[0])
        started = time.perf_counter()
        if fine_a is None:
            rot, shifts, _ = top_poses(run, truth, rows, radius, args.top_k)
            seconds = time.perf_counter() - started
            errors = torch.rad2deg(geodesic_angle_rad(rot, true_rot.unsqueeze(1)))
            report(f"exhaustive at {coarse_a:g} A", errors, (shifts[:, 0] - true_shift).norm(
                dim=1), step_deg, seconds, len(rows))
            continue
        n = run.geometry.box_size
        sphere = soft_sphere_mask(n, run.geometry.particle_radius_px, dtype=torch.float64)
        refinement = Refinement(config, full_spectra(run), half_sets(run.dataset, 0), sphere,
                                run.symmetrize, 1.0, coarse_steps(run))
        started = time.perf_counter()  # the spectra are prepared once per run, not per search
        found = half_search(refinement, run, truth, None, rows,
                            torch.ones(len(rows), dtype=torch.float64), radius,
                            n * run.geometry.pixel_size_a / fine_a,
                            refinement.world)
        seconds = time.perf_counter() - started
        errors = torch.rad2deg(geodesic_angle_rad(found.rotations, true_rot)).unsqueeze(1)
        report(f"exhaustive at {coarse_a:g} A, its {args.top_k} best re-scored at {fine_a:g} A",
               errors, (found.shifts_px - true_shift).norm(dim=1), step_deg, seconds, len(rows))


if __name__ == "__main__":
    main()
