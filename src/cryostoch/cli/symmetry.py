"""Find a map's symmetry axes for a point group and how well the group fits it.

As relion_align_symmetry: the map is centred (centre of mass to the box centre) and rotated so
that its own symmetry axes lie on the group's standard axes (RELION's placement: Cn and Dn with
the n-fold along z and the Dn 2-fold along x; T, O, I as RELION's defaults, I = I2). Prints the
rotation as RELION Euler angles, the correlation of the aligned map with its own symmetrised
copy within a soft spherical mask (C1 gives 1; a good fit is close to it) and writes the aligned
map (and, with --symmetrized-out, its symmetrised copy).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", metavar="MAP", type=Path, help="map to align (.mrc)")
    parser.add_argument("--group", required=True,
                        help="point group as RELION names it: C<n>, D<n>, T, O, I (= I2), I1..I4")
    parser.add_argument("--out", required=True, type=Path, metavar="MRC",
                        help="write the aligned map here")
    parser.add_argument("--symmetrized-out", type=Path, default=None, metavar="MRC",
                        help="also write the symmetrised aligned map here")
    parser.add_argument("--keep-centre", action="store_true",
                        help="do not move the centre of mass to the box centre first")
    parser.add_argument("--mask-radius-a", type=float, default=None, metavar="R",
                        help="radius of the soft mask of the correlations (default: 40%% of the "
                             "box)")
    parser.add_argument("--pixel-size-a", type=float, default=None, metavar="P",
                        help="pixel size in Angstrom (default: from the MRC header)")
    parser.add_argument("--seed", type=int, default=None,
                        help="turn the global search grid by a random rotation from this seed")


def _positive(value: float | None, option: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(option, f"must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryostoch.evaluate.symmetry import align_symmetry
    from cryostoch.geometry import point_group
    from cryostoch.io import read_map, write_map
    from cryostoch.io.mrc import check_map

    try:
        group = point_group(args.group)
    except ValueError as err:
        raise InputError("--group", str(err)) from None
    _positive(args.pixel_size_a, "--pixel-size-a")
    _positive(args.mask_radius_a, "--mask-radius-a")
    for option, path in (("--out", args.out), ("--symmetrized-out", args.symmetrized_out)):
        if path is not None and not Path(path).parent.is_dir():
            raise InputError(option, f"folder {str(Path(path).parent)!r} does not exist")

    volume, header_pixel = read_map(args.map)
    check_map(args.map, volume)  # cubic, finite, not constant: as fsc and --init
    n = volume.shape[-1]
    if n < 8:
        raise InputError(args.map, f"box {n} is too small to align")
    pixel = args.pixel_size_a if args.pixel_size_a is not None else header_pixel
    if pixel <= 0:
        raise InputError(args.map, "the header has no voxel size; give --pixel-size-a")
    radius_px = None if args.mask_radius_a is None else args.mask_radius_a / pixel
    if radius_px is not None and radius_px < 1:
        raise InputError("--mask-radius-a", f"{args.mask_radius_a} A is less than one pixel")

    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    fit = align_symmetry(volume, group, generator=generator, centre=not args.keep_centre,
                         mask_radius_px=radius_px)
    rot, tilt, psi = fit.euler_deg().tolist()
    sx, sy, sz = fit.centring_shift_px.tolist()
    others = fit.element_correlations[1:]
    print(f"group {group.name} (order {group.order}), box {n}, pixel {pixel:.4g} A")
    print(f"centring shift (x, y, z): {sx:.2f} {sy:.2f} {sz:.2f} px"
          + (" (kept centre)" if args.keep_centre else ""))
    print(f"rotation (RELION Euler rot, tilt, psi): {rot:.2f} {tilt:.2f} {psi:.2f} deg")
    print(f"correlation with its own symmetrised copy: {fit.correlation:.4f} (C1: 1)")
    if len(others):
        print(f"correlation with each rotated copy: min {float(others.min()):.4f}, "
              f"mean {float(others.mean()):.4f}")
    write_map(args.out, fit.aligned, pixel)
    print(f"wrote {args.out}")
    if args.symmetrized_out is not None:
        write_map(args.symmetrized_out, fit.symmetrized, pixel)
        print(f"wrote {args.symmetrized_out}")
    return 0
