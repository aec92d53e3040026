"""Baseline reconstructions: iterative projection matching or batch EM (paper Fig. 6).

METHOD is `projmatch` (give every image its best orientation and shift by cross-correlation,
reconstruct, repeat) or `em` (RELION-style batch EM: every orientation weighted by its
posterior). Both start from the same random density as `cryostoch reconstruct` with the same
seed (or --init MAP), use the same working box, cutoff and held-out test set, and update the
map in closed form with a Wiener prior (--tau2). One iteration reads every training image once
and is counted as that many gradient evaluations, so metrics.csv plots on the same axis as the
stochastic runs. Writes DIR/map.mrc, DIR/metrics.csv, DIR/poses.star, DIR/report.png,
DIR/config.json and DIR/open_in_chimerax.cxc.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from cryostoch.cli._options import (
    add_particle_options,
    add_run_options,
    apply_threads,
    particle_config_fields,
)
from cryostoch.errors import InputError

METHOD_CHOICES = ("projmatch", "em")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", metavar="METHOD",
                        help="projmatch (iterative projection matching) or em (batch EM)")
    add_particle_options(parser)
    parser.add_argument("--iterations", type=int, default=5,
                        help="passes over the training images (default 5, as in the paper)")
    parser.add_argument("--tau2", default="map",
                        help="Wiener prior variance of the M-step: 'map' (per-shell power of "
                             "the current map, as RELION), a positive number (constant) or "
                             "'none' (default map)")
    parser.add_argument("--tau2-fudge", type=float, default=1.0,
                        help="multiplies the per-shell tau^2 (RELION's --tau2_fudge; default 1)")
    parser.add_argument("--refine-iterations", type=int, default=10,
                        help="conjugate-gradient steps of the exact M-step (0: gridding only)")
    add_run_options(parser)


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
        recon = ReconstructionConfig(**particle_config_fields(args),
                                     epochs=float(args.iterations))
        return BaselineConfig(method=method, reconstruction=recon, iterations=args.iterations,
                              regulariser=regulariser,
                              refine_iterations=args.refine_iterations)
    except ValueError as err:
        raise InputError("options", str(err)) from None


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.baseline import run_baseline

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = config_from_args(args)
    apply_threads(args)
    result = run_baseline(config, overwrite=args.overwrite, progress=not args.quiet)
    nll = "n/a" if result.final_test_nll is None else f"{result.final_test_nll:.3f}"
    print(f"map: {result.map_path}")
    print(f"{config.label}: held-out NLL per image {nll} after {config.iterations} iterations "
          f"({result.gradient_evaluations} gradient-evaluation equivalents) in "
          f"{result.seconds:.1f} s")
    print(f"outputs in {result.out_dir}: map.mrc, metrics.csv, poses.star, report.html, "
          "report.png, config.json, open_in_chimerax.cxc")
    return 0
