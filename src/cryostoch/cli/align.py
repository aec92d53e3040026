"""Rotate and shift a map onto a reference map (and mirror it, with --allow-flip).

MAP is first resampled onto REF's grid (it may have another box or pixel size: Fourier
cropping or padding, then trilinear interpolation about the box centres), then superimposed on
REF by the aligner of `fsc --align` (global search over rotations with FFT translations, then
local refinement). Prints the rotation R as RELION Euler angles (rot, tilt, psi) and the shift s
(a feature of MAP at c ends up at R c + s, with c and s relative to the box centre), whether the
hand was flipped (z reversed first), and the FSC 0.5 and 0.143 resolutions of the aligned map
against REF. With --symmetry (REF's point group in RELION's axis convention, e.g. D2), the
rotation reported and applied is the equivalent one nearest the identity. Writes the aligned
map on REF's grid (box, voxel size).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryostoch.cli._options import check_output_file
from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", metavar="MAP", type=Path, help="map to move (.mrc)")
    parser.add_argument("reference", metavar="REF", type=Path,
                        help="reference map (.mrc): its grid is the output's")
    parser.add_argument("--out", required=True, type=Path, metavar="MRC",
                        help="write MAP aligned onto REF here")
    parser.add_argument("--symmetry", default="C1",
                        help="REF's point group (RELION's names and axes: C<n>, D<n>, T, O, I): "
                             "report the equivalent rotation nearest the identity (default C1)")
    parser.add_argument("--allow-flip", action="store_true",
                        help="also try MAP's mirror image and keep the better hand")
    parser.add_argument("--resolution-a", type=float, default=None, metavar="A",
                        help="finest detail used by the search, in Angstrom (default: 4 pixels)")
    parser.add_argument("--seed", type=int, default=None,
                        help="turn the global search grid by a random rotation from this seed")


def _read(path: Path):
    from cryostoch.io.mrc import check_map, read_map

    volume, pixel = read_map(path)
    check_map(path, volume)  # cubic, finite, not constant: as fsc and symmetry
    if volume.shape[-1] < 8:
        raise InputError(path, f"box {volume.shape[-1]} is too small to align")
    if pixel <= 0:
        raise InputError(path, "the header has no voxel size")
    return volume, pixel


def run(args: argparse.Namespace) -> int:
    import torch

    from cryostoch.evaluate.superimpose import align_onto
    from cryostoch.geometry import point_group
    from cryostoch.io.mrc import write_map

    try:
        group = point_group(args.symmetry)
    except ValueError as err:
        raise InputError("--symmetry", str(err)) from None
    if args.resolution_a is not None and not (
        math.isfinite(args.resolution_a) and args.resolution_a > 0
    ):
        raise InputError("--resolution-a", f"must be positive, got {args.resolution_a}")
    if args.seed is not None and args.seed < 0:
        raise InputError("--seed", f"must be >= 0, got {args.seed}")
    check_output_file(args.out, "--out")
    moving, moving_pixel = _read(args.map)
    reference, pixel = _read(args.reference)

    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    result = align_onto(reference, moving, pixel_size_a=pixel, moving_pixel_size_a=moving_pixel,
                        allow_mirror=args.allow_flip, group_matrices=group.matrices,
                        resolution_a=args.resolution_a, generator=generator)
    n, m = reference.shape[-1], moving.shape[-1]
    if result.resampled:
        print(f"{args.map} (box {m}, pixel {moving_pixel:.4g} A) resampled onto the grid of "
              f"{args.reference} (box {n}, pixel {pixel:.4g} A)")
    print(f"alignment of {args.map} onto {args.reference}"
          + (f" (symmetry {group.name}: the equivalent rotation nearest the identity)"
             if group.order > 1 else "") + ":")
    for line in result.alignment.describe(pixel):
        print(line)
    if not args.allow_flip:
        print("  (hand kept: --allow-flip tries the mirror image too)")
    fsc = result.fsc
    print(f"resolution at FSC = 0.5:   {fsc.describe_resolution(0.5)}")
    print(f"resolution at FSC = 0.143: {fsc.describe_resolution(0.143)}")
    write_map(args.out, result.volume.detach().to("cpu", torch.float32), pixel)
    print(f"wrote {args.out}")
    return 0
