"""Post-process two half maps: masked, phase-randomisation-corrected FSC and a sharpened map.

As RELION's relion_postprocess: the FSC of the half maps without and with a soft solvent mask
(given, or made automatically from the low-passed average), corrected for the mask's own
correlation by phase randomisation beyond the resolution where the unmasked FSC falls below 0.8
(Chen et al. 2013); the resolution at FSC = 0.143 of the corrected curve (of the unmasked
one where it reaches further, as RELION: the mask is then skipped unless --force-mask); and the
average map weighted by sqrt(2 FSC / (1 + FSC)), sharpened by the B-factor of a Guinier fit
(10 A to the resolution; RELION's sign: negative B sharpens) and low-passed at the resolution.
Writes map.mrc (sharpened, unmasked like RELION's postprocess.mrc), map_unsharpened.mrc,
mask.mrc, fsc.csv, fsc.png, guinier.png and postprocess.json into --out.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", metavar="HALF1", type=Path, help="first half map (.mrc)")
    parser.add_argument("half2", metavar="HALF2", type=Path, help="second half map (.mrc)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created if missing)")
    parser.add_argument("--mask", default="auto", metavar="MASK.mrc|auto",
                        help="solvent mask with values in [0, 1], or 'auto' (default): from the "
                             "average of the halves low-passed to 15 A")
    parser.add_argument("--randomize-at-a", type=float, default=None, metavar="A",
                        help="randomise phases beyond this resolution in A (default: where the "
                             "unmasked FSC falls below 0.8)")
    parser.add_argument("--bfactor", type=float, default=None, metavar="B",
                        help="apply this B-factor in A^2 instead of the Guinier fit's "
                             "(negative sharpens, as in RELION)")
    parser.add_argument("--force-mask", action="store_true",
                        help="use the masked, corrected FSC even where the unmasked FSC reaches "
                             "a finer shell (by default the mask is then skipped, as in RELION)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random phases")
    parser.add_argument("--pixel-size-a", type=float, default=None, metavar="P",
                        help="pixel size in A (default: from the MRC headers)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results in an --out folder that already has them")


def _check_options(args: argparse.Namespace) -> None:
    for option, value in (("--pixel-size-a", args.pixel_size_a),
                          ("--randomize-at-a", args.randomize_at_a)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(option, f"must be positive, got {value}")
    if args.bfactor is not None and not math.isfinite(args.bfactor):
        raise InputError("--bfactor", f"must be finite, got {args.bfactor}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{str(out)!r} is a file, not a folder")
    if (out / "map.mrc").exists() and not args.overwrite:
        raise InputError("--out", f"{str(out)!r} already holds map.mrc; give --overwrite to "
                         "replace it")


def _pixel_size(args, paths: tuple[Path, Path], pixels: tuple[float, float]) -> float:
    if args.pixel_size_a is not None:
        return float(args.pixel_size_a)
    (path_a, path_b), (pixel_a, pixel_b) = paths, pixels
    if pixel_a <= 0 or pixel_b <= 0:
        raise InputError(path_a if pixel_a <= 0 else path_b,
                         "the header has no voxel size; give --pixel-size-a")
    if abs(pixel_a - pixel_b) > 0.01 * max(pixel_a, pixel_b):
        raise InputError(path_b, f"voxel size {pixel_b:.4g} A differs by more than 1% from "
                         f"{pixel_a:.4g} A of {path_a} (give --pixel-size-a to override)")
    return float(pixel_a)


def _read_mask(path: Path, box: int, pixel: float) -> torch.Tensor:
    from cryostoch.io import read_map
    from cryostoch.io.mrc import check_map

    mask, mask_pixel = read_map(path)
    check_map(path, mask, allow_constant=True)
    if mask.shape[-1] != box:
        raise InputError(path, f"mask box {mask.shape[-1]} differs from the half maps' box {box}")
    if mask_pixel > 0 and abs(mask_pixel - pixel) > 0.01 * pixel:
        raise InputError(path, f"mask voxel size {mask_pixel:.4g} A differs from the half "
                         f"maps' {pixel:.4g} A")
    low, high = float(mask.min()), float(mask.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise InputError(path, f"mask values must lie in [0, 1], found {low:g} to {high:g}")
    return mask


def _check_randomize(value: float | None, box: int, pixel: float) -> None:
    if value is None:
        return
    if value <= 2 * pixel:
        raise InputError("--randomize-at-a", f"{value:g} A is not coarser than Nyquist "
                         f"({2 * pixel:g} A)")
    if value > box * pixel:
        raise InputError("--randomize-at-a", f"{value:g} A is coarser than the box "
                         f"({box * pixel:g} A)")


def run(args: argparse.Namespace) -> int:
    from cryostoch.evaluate.postprocess import postprocess_halves
    from cryostoch.evaluate.postprocess_output import write_postprocess
    from cryostoch.io import read_map
    from cryostoch.io.mrc import check_map

    _check_options(args)
    paths = (Path(args.half1), Path(args.half2))
    half1, pixel1 = read_map(paths[0])
    half2, pixel2 = read_map(paths[1])
    for path, volume in zip(paths, (half1, half2), strict=True):
        check_map(path, volume)
    if half1.shape != half2.shape:
        raise InputError(paths[1], f"box {half2.shape[-1]} differs from the box "
                         f"{half1.shape[-1]} of {paths[0]}")
    pixel = _pixel_size(args, paths, (pixel1, pixel2))
    box = half1.shape[-1]
    _check_randomize(args.randomize_at_a, box, pixel)
    mask = None if args.mask == "auto" else _read_mask(Path(args.mask), box, pixel)
    result = postprocess_halves(half1, half2, pixel, mask=mask,
                                randomize_at_a=args.randomize_at_a, bfactor=args.bfactor,
                                force_mask=args.force_mask,
                                generator=torch.Generator().manual_seed(args.seed))
    metadata = {"half1": str(paths[0]), "half2": str(paths[1]),
                "mask_file": None if mask is None else str(args.mask), "seed": args.seed}
    write_postprocess(result, args.out, pixel, overwrite=args.overwrite, metadata=metadata)
    final, used = result.curve("final"), result.final_curve_name
    print(f"phases randomised beyond {result.randomize_at_a:.2f} A; mask keeps "
          f"{100 * result.mask_fraction:.1f}% of the box ({'auto' if mask is None else 'given'})")
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"resolution at FSC = 0.143 ({used}): {final.describe_resolution(0.143)}")
    print(f"resolution at FSC = 0.5   ({used}): {final.describe_resolution(0.5)}")
    if result.mask_skipped:
        print("resolution at FSC = 0.143 (masked, corrected; not used): "
              f"{result.curve('corrected').describe_resolution(0.143)}")
    print(f"B-factor: {result.bfactor:.1f} A^2 ({result.bfactor_source})")
    print(f"wrote {args.out}/map.mrc and the rest of the results in {args.out}")
    return 0
