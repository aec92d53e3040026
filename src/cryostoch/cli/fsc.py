"""Fourier shell correlation between two maps, optionally after aligning them.

Prints the FSC per shell (frequency in 1/A, resolution in A) and the resolution at FSC = 0.5 and
0.143. With --align, map B is first rotated, shifted and, if that fits better, mirrored onto
map A (ab initio maps have arbitrary orientation and hand); the rotation is printed as RELION
Euler angles. The pixel size comes from the MRC headers unless --pixel-size-a is given.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryostoch.cli._options import check_output_file
from cryostoch.errors import InputError
from cryostoch.evaluate.fsc import FscReport, fsc_report

__all__ = ["add_arguments", "fsc_report", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map_a", metavar="MAP_A", type=Path, help="reference map (.mrc)")
    parser.add_argument("map_b", metavar="MAP_B", type=Path, help="map compared with MAP_A")
    parser.add_argument("--align", action="store_true",
                        help="align MAP_B onto MAP_A (rotation, shift, hand) first")
    parser.add_argument("--out", type=Path, default=None, metavar="PNG",
                        help="write a plot of the FSC curve to this PNG")
    parser.add_argument("--aligned-out", type=Path, default=None, metavar="MRC",
                        help="write MAP_B aligned onto MAP_A to this MRC (needs --align)")
    parser.add_argument("--mask-radius-a", type=float, default=None, metavar="R",
                        help="apply a soft spherical mask of radius R Angstrom to both maps")
    parser.add_argument("--pixel-size-a", type=float, default=None, metavar="P",
                        help="pixel size in Angstrom (default: from the MRC headers)")
    parser.add_argument("--resolution-a", type=float, default=None, metavar="A",
                        help="finest detail used by --align, in Angstrom (default: 4 pixels)")


def run(args: argparse.Namespace) -> int:
    from cryostoch.io import read_map
    from cryostoch.io.mrc import check_map

    path_a, path_b = Path(args.map_a), Path(args.map_b)
    if args.aligned_out is not None and not args.align:
        raise InputError("--aligned-out", "writing the aligned map needs --align")
    if args.pixel_size_a is not None and not (
        math.isfinite(args.pixel_size_a) and args.pixel_size_a > 0
    ):
        raise InputError("--pixel-size-a", f"must be positive, got {args.pixel_size_a}")
    if args.mask_radius_a is not None and not (
        math.isfinite(args.mask_radius_a) and args.mask_radius_a > 0
    ):
        raise InputError("--mask-radius-a", f"must be positive, got {args.mask_radius_a}")
    if args.resolution_a is not None and not (
        math.isfinite(args.resolution_a) and args.resolution_a > 0
    ):
        raise InputError("--resolution-a", f"must be positive, got {args.resolution_a}")
    check_output_file(args.out, "--out")
    check_output_file(args.aligned_out, "--aligned-out")

    map_a, pixel_a = read_map(path_a)
    map_b, pixel_b = read_map(path_b)
    for path, volume in ((path_a, map_a), (path_b, map_b)):
        check_map(path, volume)  # an all-NaN or all-zero map has no FSC to report
    if map_a.shape != map_b.shape:
        raise InputError(
            path_b,
            f"box {map_b.shape[-1]} differs from the box {map_a.shape[-1]} of {path_a}",
        )
    if args.pixel_size_a is not None:
        pixel = float(args.pixel_size_a)
    else:
        if pixel_a <= 0 or pixel_b <= 0:
            missing = path_a if pixel_a <= 0 else path_b
            raise InputError(missing, "the header has no voxel size; give --pixel-size-a")
        if abs(pixel_a - pixel_b) > 0.01 * max(pixel_a, pixel_b):
            raise InputError(
                path_b,
                f"voxel size {pixel_b:.4g} A differs by more than 1% from {pixel_a:.4g} A "
                f"of {path_a} (give --pixel-size-a to override)",
            )
        pixel = float(pixel_a)
    if args.mask_radius_a is not None and args.mask_radius_a / pixel < 1:
        raise InputError("--mask-radius-a", f"{args.mask_radius_a} A is less than one pixel")

    report: FscReport = fsc_report(
        map_a,
        map_b,
        pixel_size_a=pixel,
        align=args.align,
        mask_radius_a=args.mask_radius_a,
        resolution_a=args.resolution_a,
        plot_path=args.out,
        aligned_path=args.aligned_out,
        name_a=str(path_a),
        name_b=str(path_b),
        # half1/map.mrc vs half2/map.mrc, not map.mrc vs map.mrc
        title=(f"{path_a.name} vs {path_b.name}" if path_a.name != path_b.name else
               f"{path_a.parent.name}/{path_a.name} vs {path_b.parent.name}/{path_b.name}"),
    )
    print(report.text)
    if args.out is not None:
        print(f"wrote {args.out}")
    if args.aligned_out is not None:
        print(f"wrote {args.aligned_out}")
    return 0
