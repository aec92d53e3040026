"""Tune a method's learning rate (and the damping of adagrad, tonga, olbfgs, hf) on a subset.

Short reconstructions over a grid of multiples of the calibrated base rate, each for the same
budget of gradient evaluations; the lowest held-out NLL wins. Writes DIR/tune_lr.json, which
`reconstruct --lr-from DIR/tune_lr.json` reads.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cryostoch.cli._options import (
    add_method_options,
    add_particle_options,
    add_run_options,
    apply_threads,
    method_config_fields,
    particle_config_fields,
)
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.errors import InputError


def float_list(text: str | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated numbers (checked here, not by argparse: one error line)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(option, f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_particle_options(parser, writes_map=False)
    add_method_options(parser)
    parser.add_argument("--multiples", default="0.25,0.5,1,2,4",
                        help="multiples of the calibrated base rate (default 0.25,0.5,1,2,4)")
    parser.add_argument("--damping-multiples", default=None,
                        help="adagrad, tonga, olbfgs, hf: multiples of the default damping, tried "
                             "with every rate (default 0.1,1,10)")
    parser.add_argument("--subset", type=int, default=1000,
                        help="training images the short runs draw from (default 1000)")
    parser.add_argument("--budget", type=int, default=None,
                        help="single-image gradient evaluations per run (default: two passes "
                             "over the subset)")
    parser.add_argument("--extend-edges", type=int, default=0,
                        help="when the chosen rate is the grid's largest or smallest multiple, "
                             "try the next one past it (at the grid's ratio there), up to this "
                             "many times (default 0)")
    add_run_options(parser)


def config_from_args(args: argparse.Namespace):
    from cryostoch.engine.tune_lr import TuneConfig

    try:
        base = ReconstructionConfig(**particle_config_fields(args),
                                    **method_config_fields(args), write_poses=False)
    except ValueError as err:
        raise InputError("options", str(err)) from None
    if args.paper_faithful:
        base = base.paper_faithful()
    return TuneConfig(base, multiples=float_list(args.multiples, "--multiples"),
                      damping_multiples=float_list(args.damping_multiples,
                                                   "--damping-multiples"),
                      subset_images=args.subset, budget=args.budget,
                      extend_edges=args.extend_edges)


def print_table(record: dict) -> None:
    damped = record["base_damping"] is not None
    head = f"{'lr x':>6} {'lr':>10}" + (f" {'damping x':>9} {'damping':>10}" if damped else "")
    print(f"{head} {'held-out NLL':>13} {'grads':>8}")
    for point in record["grid"]:
        row = f"{point['lr_multiple']:>6g} {point['lr']:>10.4g}"
        if damped:
            row += f" {point['damping_multiple']:>9g} {point['damping']:>10.4g}"
        nll = "diverged" if point["test_nll"] is None else f"{point['test_nll']:.3f}"
        mark = "  <- chosen" if point is record["chosen"] else ""
        print(f"{row} {nll:>13} {point['gradient_evaluations']:>8}{mark}")


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.tune_lr import TUNE_FILE, tune_learning_rate

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tune = config_from_args(args)
    apply_threads(args)
    path = tune.base.out_path / TUNE_FILE
    if path.exists() and not args.overwrite:
        raise InputError(path, "exists: use --overwrite to replace it, or another --out")
    record = tune_learning_rate(tune, progress=not args.quiet)
    print_table(record)
    print(f"chosen: lr {record['lr']:.4g}" + "".join(
        f", {k} {v:.4g}" for k, v in record["optimizer_options"].items())
        + f"; {record['gradient_evaluations_total']} gradient evaluations spent in "
          f"{record['seconds']:.0f} s")
    print(f"written: {path} (use it with: cryostoch reconstruct ... --lr-from {path})")
    return 0
