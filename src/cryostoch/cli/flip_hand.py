"""Mirror a map (flip its hand): the z axis reversed about the box centre.

An ab initio map has either hand with equal likelihood; when the other hand is the right one
(an atomic model, a known structure or a higher-resolution map says so), this writes the mirror
image. The z axis is reversed about the box centre N // 2 (RELION's and cryostoch's rotation
centre; `evaluate.transform.mirror_volume`, the mirror of `align --allow-flip`), so a centred
molecule stays centred; for an even box the outermost plane, whose mirror image lies outside
the box, maps onto itself. `relion_image_handler --invert_hand` reverses x the same way (the
results differ by a half turn about y, with the same hand). The voxel size and the header's
origin are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryostoch.cli._options import check_output_file
from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", metavar="MAP", type=Path, help="map to mirror (.mrc)")
    parser.add_argument("--out", required=True, type=Path, metavar="MRC",
                        help="write the mirrored map here")


def run(args: argparse.Namespace) -> int:
    from cryostoch.evaluate.transform import mirror_volume
    from cryostoch.io.mrc import check_map, read_header, read_map, write_map

    check_output_file(args.out, "--out")
    header = read_header(args.map)
    volume, _ = read_map(args.map)
    check_map(args.map, volume)  # cubic, finite, not constant: as fsc, align and symmetry
    if min(header.voxel_size_a) <= 0:
        raise InputError(args.map, "the header has no voxel size")
    write_map(args.out, mirror_volume(volume), header.voxel_size_a,
              origin_a=header.origin_a, start_index=header.start_index)
    n = volume.shape[-1]
    print(f"mirrored {args.map} (box {n}, voxel {header.pixel_size_a:.4g} A): z reversed about "
          f"the box centre (plane {n // 2})")
    print(f"wrote {args.out}")
    return 0
