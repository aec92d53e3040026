"""Run the paper's experiments (synthetic and real data, all optimisers, baselines, report)."""

from __future__ import annotations

import argparse
import logging
import sys

from cryostoch.cli._options import add_run_options, apply_threads
from cryostoch.engine.config import OPTIMIZER_NAMES
from cryostoch.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["paper"], help="which study (the paper's section 4)")
    parser.add_argument("--out", required=True, help="output folder (report.md, figures)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the paper's 50,000 synthetic particles, and of the "
                             "real particles (at least 500; CI: 0.01)")
    parser.add_argument("--epochs", type=float, default=10.0,
                        help="gradient evaluations per method, in epochs (paper: 10)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES),
                        help="comma-separated optimisers: a subset of the paper's "
                             f"{','.join(OPTIMIZER_NAMES)} (default: all), and any "
                             "torch.optim.Optimizer subclass as package.module:Class")
    parser.add_argument("--optimizer", action="append", default=[], metavar="MODULE:CLASS",
                        help="add a torch.optim.Optimizer subclass (package.module:Class, "
                             "importable here) beside --optimizers; repeatable. It runs as "
                             "sgd does: minibatch 100, step 2 / L from the curvature (not "
                             "tuned)")
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--ctf-table", default=None,
                        help="STAR/.cs of real CTFs to draw from (default: ../shared/data's "
                             "EMPIAR-10049 table if present, else built-in defaults)")
    parser.add_argument("--real-particles", default=None,
                        help="real data STAR (default: the EMPIAR-10204 particles in "
                             "../shared/data); 'none' to skip")
    parser.add_argument("--real-max-particles", type=int, default=None,
                        help="real particles used (default: --scale of them, at least 500)")
    parser.add_argument("--baseline-iterations", type=int, default=5)
    parser.add_argument("--no-tune-lr", dest="tune_lr", action="store_false",
                        help="skip the paper's step-size tuning: every method runs at its "
                             "rate calibrated from the curvature")
    parser.add_argument("--tune-subset", type=int, default=1000,
                        help="training images each method's step size is tuned on "
                             "(default 1000)")
    parser.add_argument("--tune-budget", type=int, default=None,
                        help="gradient evaluations per point of the tuning grid (default: 4%% "
                             "of a method run's, at least 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the simulated set and the method runs that finished, and "
                             "continue an interrupted run from its checkpoint")
    add_run_options(parser)


def _optimizers(listed: str, added: list[str]) -> tuple[str, ...]:
    """--optimizers then every --optimizer, in order, each once."""
    names = [o.strip() for o in listed.split(",") if o.strip()]
    return tuple(dict.fromkeys(names + [a.strip() for a in added]))


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.experiment import ExperimentConfig, run_experiment
    from cryostoch.engine.experiment_tuning import StudyTuning

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = ExperimentConfig(
            out_dir=args.out, scale=args.scale, epochs=args.epochs, box_size=args.box,
            # a smaller box keeps the paper's field of view (128 px at 2.8 A)
            pixel_size_a=2.8 * 128 / args.box,
            optimizers=_optimizers(args.optimizers, args.optimizer),
            baseline_iterations=args.baseline_iterations, seed=args.seed, device=args.device,
            ctf_table=args.ctf_table, real_particles=args.real_particles,
            real_max_particles=args.real_max_particles,
            tuning=(StudyTuning(subset_images=args.tune_subset, budget=args.tune_budget)
                    if args.tune_lr else None),
        )
    except ValueError as err:
        raise InputError("options", str(err)) from None
    apply_threads(args)
    report = run_experiment(config, progress=not args.quiet, resume=args.resume)
    print(f"report: {report}")
    return 0
