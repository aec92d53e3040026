"""Run the demo: simulate from the phantom, reconstruct ab initio, compare with the truth."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from cryostoch.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--n-particles", type=int, default=5000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel-size-a", type=float, default=5.0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-freq", type=float, default=0.25,
                        help="likelihood cutoff as a fraction of Nyquist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ctf-table", default=None,
                        help="STAR/.cs to draw CTFs from (default: ../shared/data's EMPIAR-10049 "
                             "table if present, else built-in defaults)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from cryostoch.engine.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = DemoConfig(
            out_dir=args.out, n_particles=args.n_particles, box_size=args.box,
            pixel_size_a=args.pixel_size_a, epochs=args.epochs, max_freq=args.max_freq,
            seed=args.seed, device=args.device, ctf_table=args.ctf_table,
        )
    except ValueError as err:
        raise InputError("options", str(err)) from None
    start = time.perf_counter()
    result = run_demo(config, progress=not args.quiet)
    fsc = result.fsc.fsc
    cutoff_a = config.box_size * config.pixel_size_a / (config.max_freq * config.box_size / 2)
    print()
    print(result.fsc.text)
    print()
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  simulated data:  {result.simulation.star_path} (+ particles.mrcs, ground_truth.mrc,"
          " montage.png)")
    print(f"  ab initio map:   {result.reconstruction.map_path}")
    print(f"  report:          {result.reconstruction.out_dir / 'report.png'}")
    print(f"  aligned map:     {result.aligned_map}")
    print(f"  FSC plot:        {result.fsc_plot}")
    print(f"  FSC 0.5 at {fsc.resolution_at(0.5):.1f} A, 0.143 at {fsc.resolution_at(0.143):.1f} A "
          f"(likelihood cutoff {cutoff_a:.1f} A)")
    return 0
