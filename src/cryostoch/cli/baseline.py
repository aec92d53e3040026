"""Baseline reconstructions: iterative projection matching or batch EM (paper Fig. 6).

METHOD is `projmatch` (give every image its best orientation and shift by cross-correlation,
reconstruct, repeat) or `em` (RELION-style batch EM: every orientation weighted by its
posterior). Both start from the same random density as `cryostoch reconstruct` with the same
seed (or --init MAP), use the same working box, cutoff and held-out test set, and update the
map in closed form with a Wiener prior (--tau2). One iteration reads every training image once
and is counted as that many gradient evaluations, so metrics.csv plots on the same axis as the
stochastic runs. Writes DIR/map.mrc, DIR/metrics.csv, DIR/poses.star, DIR/report.png and
DIR/config.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from cryostoch.errors import InputError

METHOD_CHOICES = ("projmatch", "em")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", metavar="METHOD",
                        help="projmatch (iterative projection matching) or em (batch EM)")
    parser.add_argument("particles", help="RELION STAR or cryoSPARC .cs file of particles")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--iterations", type=int, default=5,
                        help="passes over the training images (default 5, as in the paper)")
    parser.add_argument("--init", default="random", help="'random' (sum of spheres) or a map")
    parser.add_argument("--max-freq", type=float, default=0.10,
                        help="likelihood cutoff as a fraction of Nyquist (default 0.10)")
    parser.add_argument("--resolution-a", type=float, default=None,
                        help="likelihood cutoff in Angstrom (overrides --max-freq)")
    parser.add_argument("--box", type=int, default=None,
                        help="Fourier-crop the images to this working box first")
    parser.add_argument("--tau2", default="map",
                        help="Wiener prior variance of the M-step: 'map' (per-shell power of "
                             "the current map, as RELION), a positive number (constant) or "
                             "'none' (default map)")
    parser.add_argument("--tau2-fudge", type=float, default=1.0,
                        help="multiplies the per-shell tau^2 (RELION's --tau2_fudge; default 1)")
    parser.add_argument("--refine-iterations", type=int, default=10,
                        help="conjugate-gradient steps of the exact M-step (0: gridding only)")
    parser.add_argument("--test-size", type=int, default=100, help="held-out test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 or float64")
    parser.add_argument("--shift-range-a", type=float, default=0.0,
                        help="radius of the shift search in Angstrom (0: no shifts)")
    parser.add_argument("--shift-sigma-a", type=float, default=None,
                        help="sigma of the normal shift prior (default: half the range)")
    parser.add_argument("--particle-diameter-a", type=float, default=None,
                        help="particle diameter (default 80%% of the box)")
    sign = parser.add_mutually_exclusive_group()
    sign.add_argument("--invert", dest="invert", action="store_true", default=None,
                      help="multiply the data by -1 (default: detect the contrast sign)")
    sign.add_argument("--no-invert", dest="invert", action="store_false",
                      help="use the data's sign as given")
    parser.add_argument("--project-root", default=None,
                        help="folder that relative image paths start from")
    parser.add_argument("--half-set", type=int, default=None,
                        help="use only the odd (1) or even (2) particles, for half-map FSC")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The `BaselineConfig` of the parsed arguments; InputError (one line) on bad values."""
    from cryostoch.baselines import Regulariser
    from cryostoch.engine.baseline import BaselineConfig
    from cryostoch.engine.config import ReconstructionConfig

    method = str(args.method).strip().lower()
    if method not in METHOD_CHOICES:
        raise InputError("METHOD", f"must be projmatch or em, got {args.method!r}")
    if args.iterations < 1:
        raise InputError("--iterations", f"must be >= 1, got {args.iterations}")
    if args.refine_iterations < 0:
        raise InputError("--refine-iterations", f"must be >= 0, got {args.refine_iterations}")
    if not (math.isfinite(args.tau2_fudge) and args.tau2_fudge > 0):
        raise InputError("--tau2-fudge", f"must be positive, got {args.tau2_fudge}")
    try:
        regulariser = Regulariser.parse(args.tau2, args.tau2_fudge)
    except ValueError as err:
        raise InputError("--tau2", str(err)) from None
    try:
        recon = ReconstructionConfig(
            particles=args.particles, out_dir=args.out, epochs=float(args.iterations),
            max_freq=args.max_freq, resolution_a=args.resolution_a, box_size=args.box,
            init=args.init, test_size=args.test_size, seed=args.seed, device=args.device,
            dtype=args.dtype, shift_range_a=args.shift_range_a, shift_sigma_a=args.shift_sigma_a,
            particle_diameter_a=args.particle_diameter_a, invert=args.invert,
            project_root=args.project_root, half_set=args.half_set,
        )
        return BaselineConfig(method=method, reconstruction=recon, iterations=args.iterations,
                              regulariser=regulariser,
                              refine_iterations=args.refine_iterations)
    except ValueError as err:
        raise InputError("options", str(err)) from None


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.baseline import run_baseline

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = config_from_args(args)
    result = run_baseline(config, progress=not args.quiet)
    nll = "n/a" if result.final_test_nll is None else f"{result.final_test_nll:.3f}"
    print(f"map: {result.map_path}")
    print(f"{config.label}: held-out NLL per image {nll} after {config.iterations} iterations "
          f"({result.gradient_evaluations} gradient-evaluation equivalents) in "
          f"{result.seconds:.1f} s")
    print(f"outputs in {result.out_dir}: map.mrc, metrics.csv, poses.star, report.png, "
          "config.json")
    return 0
