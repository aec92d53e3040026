"""Write the paper's random initial density (Fig. 5): a sum of random spheres.

30 soft-edged spheres of random radius (5-25% of the particle radius) and random positive
density, centred uniformly inside the particle radius; deterministic given --seed. The map has
mean density 1 over its occupied voxels (`cryostoch reconstruct` rescales its start to the data).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryostoch.errors import InputError

DEFAULT_DIAMETER_FRACTION = 0.8  # of the box, as `cryostoch reconstruct` assumes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--box", type=int, required=True, metavar="B", help="box size in pixels")
    parser.add_argument("--pixel-size-a", type=float, required=True, metavar="P",
                        help="voxel size in Angstrom")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, type=Path, metavar="MRC", help="output map")
    parser.add_argument("--particle-diameter-a", type=float, default=None, metavar="D",
                        help="diameter of the sphere the spheres lie in, Angstrom (default "
                        "80%% of the box)")
    parser.add_argument("--n-spheres", type=int, default=30, metavar="K",
                        help="number of spheres (default 30)")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryostoch.engine.checks import refuse_if_short
    from cryostoch.io.mrc import write_map
    from cryostoch.simulate.init import random_spheres_volume

    box, pixel = args.box, args.pixel_size_a
    if box < 16 or box % 2:  # as simulate and reconstruct
        raise InputError("--box", f"must be an even number >= 16, got {box}")
    if not (math.isfinite(pixel) and pixel > 0):
        raise InputError("--pixel-size-a", f"must be a positive number, got {pixel}")
    if args.seed < 0:
        raise InputError("--seed", f"must be a non-negative integer, got {args.seed}")
    if args.n_spheres < 1:
        raise InputError("--n-spheres", f"must be a positive integer, got {args.n_spheres}")
    diameter = args.particle_diameter_a
    if diameter is None:
        diameter = DEFAULT_DIAMETER_FRACTION * box * pixel
    if not (math.isfinite(diameter) and diameter > 0):
        raise InputError("--particle-diameter-a", f"must be a positive number, got {diameter}")
    if diameter > box * pixel:
        raise InputError(
            "--particle-diameter-a",
            f"{diameter:g} A does not fit in the box of {box} x {pixel:g} = {box * pixel:g} A",
        )
    out: Path = args.out
    if not out.parent.is_dir():
        raise InputError(out, f"folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise InputError(out, "is a folder; give the path of the map to write")
    # float64 coordinate grids and distances, measured at about 6 copies of the volume
    refuse_if_short("--box", 6 * 8 * box**3, torch.device("cpu"), "use a smaller --box")
    radius_px = diameter / (2 * pixel)
    generator = torch.Generator().manual_seed(args.seed)
    volume = random_spheres_volume(box, radius_px, generator, n_spheres=args.n_spheres)
    write_map(out, volume, pixel)
    print(f"random initial density ({args.n_spheres} spheres within {diameter:g} A, seed "
          f"{args.seed}): {out} ({box}^3 at {pixel:g} A)")
    return 0
