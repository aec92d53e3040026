"""Reconstruct a map ab initio from particle images (STAR or cryoSPARC .cs).

Writes DIR/map.mrc, DIR/snapshots/*.mrc, DIR/metrics.csv, DIR/poses.star, DIR/report.png,
DIR/config.json, DIR/open_in_chimerax.cxc (opens the maps in ChimeraX) and a checkpoint
(DIR/checkpoint.pt) that --resume continues exactly. With --refine, the map is then refined
with gold-standard half sets (`cryostoch refine`) into DIR/refine/.
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
    int_list,
    method_config_fields,
    particle_config_fields,
)
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_particle_options(parser)
    add_method_options(parser)
    parser.add_argument("--epochs", type=float, default=None,
                        help="passes over the data (default: one, and at least 150 minibatch "
                             "steps: many passes over a small data set)")
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate (default: set from the curvature at the start)")
    parser.add_argument("--lr-from", default=None, metavar="TUNE_LR_JSON",
                        help="the learning rate (and damping) chosen by cryostoch tune-lr for "
                             "this --optimizer")
    parser.add_argument("--classes", type=int, default=1,
                        help="maps reconstructed at once; each particle's class is marginalised "
                             "with its pose, so junk and ice can go to classes of their own "
                             "(default 1)")
    parser.add_argument("--refine", action="store_true",
                        help="then refine the map with gold-standard half sets to the data's "
                             "resolution (cryostoch refine, outputs in DIR/refine)")
    parser.add_argument("--refine-iterations", type=int, default=None, metavar="N",
                        help="with --refine: its most iterations before the last one to "
                             "Nyquist (refine's --iterations; default 12)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint.pt")
    parser.add_argument("--snapshots", type=int_list, default=(),
                        help="gradient-evaluation counts at which to save maps, e.g. 5000,50000")
    parser.add_argument("--test-every", type=int, default=20,
                        help="iterations between held-out NLL evaluations")
    parser.add_argument("--checkpoint-interval-s", type=float, default=300.0)
    add_run_options(parser)


def tuned_rate(args: argparse.Namespace) -> tuple[float | None, dict]:
    """(lr, optimizer options): --lr, or those tune-lr chose (for the same optimiser)."""
    if args.lr_from is None:
        return args.lr, {}
    if args.lr is not None:
        raise InputError("--lr-from", "give --lr or --lr-from, not both")
    from cryostoch.engine.tune_lr import read_tuned

    name, lr, options = read_tuned(args.lr_from)
    if name != args.optimizer:
        raise InputError(args.lr_from, f"was tuned for --optimizer {name}, not {args.optimizer}")
    return lr, options


def config_from_args(args: argparse.Namespace) -> ReconstructionConfig:
    lr, options = tuned_rate(args)
    try:
        config = ReconstructionConfig(
            **particle_config_fields(args), **method_config_fields(args), epochs=args.epochs,
            lr=lr, optimizer_options=options, snapshots=tuple(args.snapshots),
            test_every=args.test_every, checkpoint_interval_s=args.checkpoint_interval_s,
            classes=args.classes,
        )
    except ValueError as err:
        raise InputError("options", str(err)) from None
    return config.paper_faithful() if args.paper_faithful else config


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.distributed import joined

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = config_from_args(args)
    apply_threads(args)
    with joined(config.device):  # under torchrun: one process group for both steps
        return _reconstruct_and_refine(config, args)


def _reconstruct_and_refine(config: ReconstructionConfig, args: argparse.Namespace) -> int:
    from cryostoch.engine.reconstruct import reconstruct

    if args.refine_iterations is not None:  # checked before the ab initio run, not after it
        if not args.refine:
            raise InputError("--refine-iterations", "applies only with --refine")
        if args.refine_iterations < 1:
            raise InputError("--refine-iterations", "must be at least 1")
    result = reconstruct(config, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.quiet)
    nll = "n/a" if result.final_test_nll is None else f"{result.final_test_nll:.3f}"
    print(f"map: {result.map_path}")
    print(f"held-out NLL per image: {nll}; {result.gradient_evaluations} gradient evaluations "
          f"in {result.seconds:.1f} s")
    print(f"outputs in {result.out_dir}: map.mrc, metrics.csv, poses.star, report.html, "
          "report.png, config.json, open_in_chimerax.cxc, snapshots/")
    if args.refine:
        _refine(config, result.map_path, args)
    return 0


def _refine(config: ReconstructionConfig, map_path, args: argparse.Namespace) -> None:
    """`cryostoch refine` of the ab initio map into DIR/refine, with the same particles."""
    from pathlib import Path

    from cryostoch.engine.refine_data import RefineConfig
    from cryostoch.engine.refine_run import refine

    refine_config = RefineConfig(
        particles=config.particles, init_map=str(map_path),
        out_dir=str(Path(config.out_dir) / "refine"), symmetry=config.symmetry,
        initial_resolution_a=config.resolution_a,
        particle_diameter_a=config.particle_diameter_a, shift_range_a=config.shift_range_a,
        class_file=config.class_file, keep_classes=config.keep_classes, seed=config.seed,
        device=config.device, dtype=config.dtype, invert=config.invert,
        project_root=config.project_root, cache_dir=config.cache_dir,
        **({} if args.refine_iterations is None else
           {"max_iterations": args.refine_iterations}))
    result = refine(refine_config, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.quiet)
    print(f"refined map: {result.map_path} (gold-standard FSC 0.143: "
          f"{result.resolution_a:.2f} A, {result.iterations} iterations in "
          f"{result.seconds:.0f} s)")
