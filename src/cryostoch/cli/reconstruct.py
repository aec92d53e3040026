"""Reconstruct a map ab initio from particle images (STAR or cryoSPARC .cs).

Writes DIR/map.mrc, DIR/snapshots/*.mrc, DIR/metrics.csv, DIR/poses.star, DIR/report.png,
DIR/config.json and a checkpoint (DIR/checkpoint.pt) that --resume continues exactly.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cryostoch.engine.config import OPTIMIZER_NAMES, ReconstructionConfig
from cryostoch.errors import InputError

DEFAULT_OPTIMIZER = "sgd"


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="RELION STAR or cryoSPARC .cs file of particles")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=OPTIMIZER_NAMES,
                        help=f"stochastic optimiser (default {DEFAULT_OPTIMIZER})")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--max-freq", type=float, default=0.10,
                        help="likelihood cutoff as a fraction of Nyquist (default 0.10)")
    parser.add_argument("--resolution-a", type=float, default=None,
                        help="likelihood cutoff in Angstrom (overrides --max-freq)")
    parser.add_argument("--box", type=int, default=None,
                        help="Fourier-crop the images to this working box first")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="minibatch size (default 100; 300 for hf)")
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate (default: set from the curvature at the start)")
    parser.add_argument("--lambda-plus", type=float, default=1e-4,
                        help="prior strength on positive density (sparsity)")
    parser.add_argument("--lambda-minus", type=float, default=1e-4,
                        help="prior strength on negative density")
    parser.add_argument("--init", default="random", help="'random' (sum of spheres) or a map")
    parser.add_argument("--test-size", type=int, default=100, help="held-out test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--snapshots", type=int_list, default=(),
                        help="gradient-evaluation counts at which to save maps, e.g. 5000,50000")
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
    parser.add_argument("--class-file", default=None,
                        help="RELION 2-D classification _data.star to select particles by class")
    parser.add_argument("--keep-classes", type=int_list, default=(),
                        help="class numbers to keep from --class-file, e.g. 1,4,7")
    parser.add_argument("--half-set", type=int, choices=[1, 2], default=None,
                        help="use only the odd (1) or even (2) particles, for half-map FSC")
    parser.add_argument("--test-every", type=int, default=20,
                        help="iterations between held-out NLL evaluations")
    parser.add_argument("--checkpoint-interval-s", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 can be faster "
                             "on a machine busy with other jobs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ReconstructionConfig:
    try:
        return ReconstructionConfig(
            particles=args.particles, out_dir=args.out, optimizer=args.optimizer,
            epochs=args.epochs, max_freq=args.max_freq, resolution_a=args.resolution_a,
            box_size=args.box, batch_size=args.batch_size, lr=args.lr,
            lambda_plus=args.lambda_plus, lambda_minus=args.lambda_minus, init=args.init,
            test_size=args.test_size, seed=args.seed, device=args.device, dtype=args.dtype,
            snapshots=tuple(args.snapshots), shift_range_a=args.shift_range_a,
            shift_sigma_a=args.shift_sigma_a, particle_diameter_a=args.particle_diameter_a,
            invert=args.invert, project_root=args.project_root, class_file=args.class_file,
            keep_classes=tuple(args.keep_classes), half_set=args.half_set,
            test_every=args.test_every, checkpoint_interval_s=args.checkpoint_interval_s,
        )
    except ValueError as err:
        raise InputError("options", str(err)) from None


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.reconstruct import reconstruct

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads", "must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    result = reconstruct(config, resume=args.resume, progress=not args.quiet)
    nll = "n/a" if result.final_test_nll is None else f"{result.final_test_nll:.3f}"
    print(f"map: {result.map_path}")
    print(f"held-out NLL per image: {nll}; {result.gradient_evaluations} gradient evaluations "
          f"in {result.seconds:.1f} s")
    print(f"outputs in {result.out_dir}: map.mrc, metrics.csv, poses.star, report.png, "
          "config.json, snapshots/")
    return 0
