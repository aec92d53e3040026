"""Gold-standard refinement of a map against the particles (RELION's auto-refine).

Two half sets refined independently from the low-passed --init map: a global pose search at
the start resolution, then local searches whose cutoff follows the half maps' FSC, to
convergence. Writes DIR/map.mrc (FSC-weighted, sharpened), map_unsharpened.mrc, half1.mrc,
half2.mrc, mask.mrc, fsc.csv, fsc.png, guinier.png, postprocess.json, poses.star, metrics.csv
and refine.json; DIR/checkpoint.pt after every iteration, continued by --resume.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cryostoch.cli._options import add_data_options, add_run_options, apply_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="RELION STAR or cryoSPARC .cs file of particles")
    parser.add_argument("--init", required=True,
                        help="start map (MRC), e.g. an ab initio map.mrc; low-passed first")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--symmetry", default="C1",
                        help="point group imposed on the half maps (RELION's names; default C1)")
    parser.add_argument("--initial-resolution-a", type=float, default=None,
                        help="low-pass of the start map and resolution of the first, global "
                             "search (default: a fifth of the particle diameter, as ab initio)")
    parser.add_argument("--shift-range-a", type=float, default=None,
                        help="radius of the global search's shifts (default 8%% of the box)")
    parser.add_argument("--iterations", type=int, default=12,
                        help="most iterations before the last one to Nyquist (default 12; "
                             "it stops earlier at convergence)")
    parser.add_argument("--search-extent", type=int, default=2,
                        help="local search window: +-this many steps on each rotation and "
                             "shift axis (default 2: 125 rotations x 25 shifts per particle)")
    parser.add_argument("--fine-pass", action=argparse.BooleanOptionalAction, default=True,
                        help="sample the cells that hold most of each particle's posterior "
                             "again at half the steps, for the reconstruction and the poses "
                             "(RELION's adaptive oversampling; default on)")
    parser.add_argument("--particle-scale", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="estimate an amplitude scale per particle each iteration (mean "
                             "1), for contrast that varies between particles (default off)")
    parser.add_argument("--global-searches", type=int, default=6,
                        help="global pose searches in all, each half against its own map: "
                             "the first, then one before every iteration that follows a gain "
                             "in resolution (and one when local searches have converged, if "
                             "the cutoff grew 30%% since the last): exhaustive at the finest "
                             "affordable cutoff, its --global-top-k best poses re-scored at "
                             "the resolution reached (default 6; 1: local searches only "
                             "after the first)")
    parser.add_argument("--global-top-k", type=int, default=20,
                        help="poses per particle that a later global search's exhaustive "
                             "stage keeps for re-scoring at the current cutoff (default 20; 1: "
                             "the exhaustive search alone)")
    parser.add_argument("--reference-mask", default="auto",
                        help="mask of the references in the pose search: auto (default: a "
                             "soft solvent mask of the current half maps' average, inside the "
                             "particle's sphere, as cryoSPARC's dynamic mask) or sphere (the "
                             "particle diameter only)")
    parser.add_argument("--poses-from-input", action="store_true",
                        help="start from the poses in the particles file (e.g. an ab initio "
                             "run's poses.star) instead of a global search")
    parser.add_argument("--seed", type=int, default=0, help="half-set split (default 0)")
    add_data_options(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint.pt")
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.refine_data import RefineConfig
    from cryostoch.engine.refine_run import refine

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    apply_threads(args)
    config = RefineConfig(
        particles=args.particles, init_map=args.init, out_dir=args.out, symmetry=args.symmetry,
        initial_resolution_a=args.initial_resolution_a,
        particle_diameter_a=args.particle_diameter_a, shift_range_a=args.shift_range_a,
        max_iterations=args.iterations, poses_from_input=args.poses_from_input,
        search_extent=args.search_extent, fine_pass=args.fine_pass,
        particle_scale=args.particle_scale,
        global_rounds=args.global_searches, global_top_k=args.global_top_k,
        reference_mask=args.reference_mask,
        class_file=args.class_file, keep_classes=tuple(args.keep_classes), seed=args.seed,
        device=args.device, dtype=args.dtype, invert=args.invert,
        project_root=args.project_root, cache_dir=args.cache_dir)
    result = refine(config, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.quiet)
    print(f"map: {result.map_path}")
    curve = ("unmasked: the mask was skipped" if result.fsc_used == "unmasked"
             else "masked, corrected")
    print(f"gold-standard resolution (FSC 0.143, {curve}): {result.resolution_a:.2f} A "
          f"after {result.iterations} iterations in {result.seconds:.0f} s")
    print(f"outputs in {result.out_dir}: map.mrc, map_unsharpened.mrc, half1.mrc, half2.mrc, "
          "mask.mrc, fsc.csv, fsc.png, guinier.png, postprocess.json, poses.star, metrics.csv, "
          "refine.json, report.html, open_in_chimerax.cxc")
    return 0
