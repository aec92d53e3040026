"""Compare estimated poses with true ones (a simulated set), in the estimate's own frame and hand.

    cryostoch pose-error refined/poses.star sim/particles.star [--symmetry D2] [--out DIR]

The particles are matched by image (stack file and index; either file may hold a subset). The
global rotation and hand that relate the estimate's frame to the truth's are found from the
poses themselves (`evaluate.pose_error`): no map is needed. Printed: the frame, the share of
particles within 5, 10 and 20 deg of their true pose (to the nearest symmetry mate of the
truth's point group `--symmetry`), the median angular and shift errors, and the further frames
that groups of the remaining particles share (how a pseudo-symmetric particle's mates were
confused), with the share within 5, 10 and 20 deg of the nearest of those frames. With
`--out`: pose_errors.csv (one row per matched particle) and pose_error.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from cryostoch.errors import InputError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("estimated", metavar="ESTIMATED", type=Path,
                        help="STAR/.cs with the poses to judge (e.g. refine's poses.star)")
    parser.add_argument("truth", metavar="TRUE", type=Path,
                        help="STAR/.cs with the true poses (e.g. simulate's particles.star)")
    parser.add_argument("--symmetry", default="C1",
                        help="the true map's point group in RELION's axes (default C1)")
    parser.add_argument("--inlier-deg", type=float, default=10.0, metavar="DEG",
                        help="a particle agrees with a frame within this angle (default 10)")
    parser.add_argument("--modes", type=int, default=4,
                        help="frames to look for among the particles (default 4)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write pose_errors.csv and pose_error.json here")


def _keyed_poses(path: Path):
    """(keys, rotations (N, 3, 3), shifts_px (N, 2), pixel sizes (N,)) of a particle file; a key
    is RELION's image name with the stack's resolved path (its file name if not found)."""
    from cryostoch.geometry.rotations import euler_to_matrix
    from cryostoch.io.dataset import read_particle_table

    table = read_particle_table(path, check_images=False)
    if table.poses is None:
        raise InputError(path, "has no poses (rlnAngleRot/Tilt/Psi or alignments3D)")
    names = [str(s.path.resolve()) if s.path is not None else Path(s.written).name
             for s in table.stacks]
    if not names:
        raise InputError(path, "names no image stacks: particles cannot be matched")
    keys = [f"{int(slot) + 1:06d}@{names[int(stack)]}" for stack, slot in
            zip(table.stack_id, table.stack_slot, strict=True)]
    return (keys, euler_to_matrix(table.poses.euler_deg), table.poses.shifts_px,
            np.asarray(table.pixel_size_a, dtype=float))


def _matched(args: argparse.Namespace):
    est_keys, est_rot, est_shift, pixel = _keyed_poses(args.estimated)
    true_keys, true_rot, true_shift, _ = _keyed_poses(args.truth)
    where = {key: i for i, key in enumerate(true_keys)}
    pairs = [(i, where[key]) for i, key in enumerate(est_keys) if key in where]
    if len(pairs) < 3:
        raise InputError(args.estimated, f"only {len(pairs)} of its {len(est_keys)} particles "
                         f"are in {args.truth} (matched by stack file and index)")
    e, t = (np.array(side) for side in zip(*pairs, strict=True))
    keys = [est_keys[i] for i in e]
    return keys, est_rot[e], true_rot[t], est_shift[e], true_shift[t], pixel[e]


def _summary(errors, modes, any_frame_deg, pixel_a: float, n_est: int) -> dict:
    from cryostoch.geometry.rotations import geodesic_angle_rad

    angle, shift = errors.angle_deg, errors.shift_px
    first = modes[0].rotation
    return {
        "matched": int(angle.numel()), "estimated_rows": n_est,
        "mirrored": errors.frame.mirrored,
        "frame_euler_deg": [round(float(v), 3) for v in errors.frame_euler_deg],
        "map_translation_px": [round(float(v), 3) for v in errors.translation_px],
        "within_deg": {str(d): round(errors.share_within(d), 4) for d in (5, 10, 20)},
        "within_deg_of_any_frame": {str(d): round(float((any_frame_deg <= d).double().mean()), 4)
                                    for d in (5, 10, 20)},
        "angle_error_deg_percentiles": {str(p): round(float(angle.quantile(p / 100)), 3)
                                        for p in (25, 50, 75, 90)},
        "shift_error_a_median": round(float(shift.median()) * pixel_a, 3),
        "shift_error_a_median_within_10_deg": round(
            float(shift[angle <= 10].median()) * pixel_a, 3) if bool((angle <= 10).any())
        else None,
        "modes": [{"share": round(m.inlier_share, 4),
                   "angle_from_first_deg": round(math.degrees(float(
                       geodesic_angle_rad(m.rotation, first))), 2)} for m in modes],
    }


def _write(out: Path, keys, errors, modes, pixel, summary: dict) -> None:
    import pandas as pd

    mode_of = np.zeros(len(keys), dtype=int)
    for number, mode in enumerate(modes, start=1):
        mode_of[mode.inliers.numpy()] = number
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"image": keys, "angle_error_deg": errors.angle_deg.numpy(),
                          "shift_error_a": errors.shift_px.numpy() * pixel, "mode": mode_of})
    partial = out / ".pose_errors.csv.partial"
    table.to_csv(partial, index=False, float_format="%.4f")
    partial.replace(out / "pose_errors.csv")
    partial = out / ".pose_error.json.partial"
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    partial.replace(out / "pose_error.json")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryostoch.evaluate.pose_error import (
        frame_modes,
        nearest_frame_angles_deg,
        pose_errors,
    )
    from cryostoch.geometry.symmetry import point_group

    if not (math.isfinite(args.inlier_deg) and 0 < args.inlier_deg < 180):
        raise InputError("--inlier-deg", f"must lie in (0, 180), got {args.inlier_deg}")
    if args.modes < 1:
        raise InputError("--modes", f"must be at least 1, got {args.modes}")
    try:
        group = point_group(args.symmetry).matrices
    except ValueError as err:
        raise InputError("--symmetry", str(err)) from None
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError("--out", f"{str(args.out)!r} is a file, not a folder")
    keys, est, true, est_shift, true_shift, pixel = _matched(args)
    modes = frame_modes(est, true, group, inlier_deg=args.inlier_deg, max_modes=args.modes,
                        generator=torch.Generator().manual_seed(0))
    errors = pose_errors(est, true, est_shift, true_shift, modes[0], group)
    pixel_a = float(np.nanmedian(pixel)) if np.isfinite(pixel).any() else 1.0
    any_frame = nearest_frame_angles_deg(est, true, modes, group)
    summary = _summary(errors, modes, any_frame, pixel_a, len(keys))
    rot, tilt, psi = summary["frame_euler_deg"]
    print(f"{summary['matched']} particles matched; frame: rot {rot:.1f}, tilt {tilt:.1f}, "
          f"psi {psi:.1f} deg, {'mirrored' if errors.frame.mirrored else 'same hand'}")
    within = summary["within_deg"]
    print(f"within 5 / 10 / 20 deg of the true pose ({args.symmetry.upper()}): "
          f"{100 * within['5']:.1f}% / {100 * within['10']:.1f}% / {100 * within['20']:.1f}%; "
          f"median angular error {summary['angle_error_deg_percentiles']['50']:.2f} deg, "
          f"median shift error {summary['shift_error_a_median']:.2f} A")
    for number, mode in enumerate(summary["modes"], start=1):
        print(f"frame {number}: {100 * mode['share']:.1f}% of the particles, "
              f"{mode['angle_from_first_deg']:.1f} deg from frame 1")
    if len(modes) > 1:
        within = summary["within_deg_of_any_frame"]
        print(f"within 5 / 10 / 20 deg of the nearest frame: {100 * within['5']:.1f}% / "
              f"{100 * within['10']:.1f}% / {100 * within['20']:.1f}% (errors modulo the "
              "mates the frames stand for)")
    if args.out is not None:
        _write(args.out, keys, errors, modes, pixel, summary)
        print(f"wrote {args.out}/pose_errors.csv and {args.out}/pose_error.json")
    return 0
