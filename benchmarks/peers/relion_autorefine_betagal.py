"""RELION 3.1's auto-refine on the real beta-galactosidase particles, beside `cryostoch refine`.

Example (the README's comparison; hours on 2 cores):
    python benchmarks/peers/relion_autorefine_betagal.py --work ../relion_betagal \
        --init final_d2/map.mrc --half-sets refined/poses.star

Writes float32 copies of the particle stacks (RELION 3.1 cannot read MRC mode 12), with the
half sets of a `cryostoch refine` run's poses.star copied in (`rlnRandomSubset`, so both
programs split the particles the same way), then runs `relion_refine_mpi --auto_refine` from
the same start map at the settings RELION's GUI chooses for these particles (D2, 200 A mask,
start at 36.2 A: the ab initio cutoff). RELION's own log (`run.log`) and its half maps are in
--work/Refine3D; `cryostoch postprocess` on them gives resolutions measured the same way as
refine's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from relion_peer import ensure_relion  # noqa: E402

BETAGAL = common.DATA / "betagal_empiar10204"
PARTICLES = BETAGAL / "Extract" / "job009" / "particles.star"


def float32_copy(work: Path, half_sets: Path | None) -> Path:
    """particles_f32.star in `work` with its float32 stacks under the same relative paths."""
    import mrcfile
    import numpy as np

    from cryostoch.io.star import read_star, split_particle_blocks, write_particles_star

    optics, particles = split_particle_blocks(PARTICLES, read_star(PARTICLES))
    for stack in particles["rlnImageName"].str.split("@", n=1).str[1].unique():
        target = work / stack
        target.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.mmap(BETAGAL / stack, mode="r", permissive=True) as source:
            images, voxel = np.asarray(source.data, dtype=np.float32), source.voxel_size.x
        with mrcfile.new(target, overwrite=True) as out:
            out.set_data(images)
            out.set_image_stack()
            out.voxel_size = float(voxel)
    if half_sets is not None:
        _, refined = split_particle_blocks(half_sets, read_star(half_sets))
        names = [name.rsplit("/", 1)[-1] for name in particles["rlnImageName"]]
        if [name.rsplit("/", 1)[-1] for name in refined["rlnImageName"]] != names:
            raise SystemExit(f"{half_sets}: its particles are not those of {PARTICLES}")
        particles["rlnRandomSubset"] = refined["rlnRandomSubset"].to_numpy()
    star = work / "particles_f32.star"
    write_particles_star(star, optics, particles)
    return star


def autorefine_command(star: Path, init_map: Path, initial_resolution_a: float,
                       workers: int = 2, local_healpix_order: int = 4) -> list[str]:
    """RELION's auto-refine with `workers` processes of one thread each (plus the master);
    local searches from HEALPix order `local_healpix_order` (4: 3.75 deg, the GUI's default;
    3: 7.5 deg, which skips the slow global searches at 3.75 deg)."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(workers + 1),
            "relion_refine_mpi", "--o", "Refine3D/run", "--auto_refine",
            "--split_random_halves", "--i", star.name, "--ref", str(init_map.resolve()),
            "--firstiter_cc", "--ini_high", f"{initial_resolution_a:g}",
            "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--ctf",
            "--particle_diameter", "200", "--flatten_solvent", "--zero_mask",
            "--oversampling", "1", "--healpix_order", "2",
            "--auto_local_healpix_order", str(local_healpix_order),
            "--offset_range", "5", "--offset_step", "2", "--sym", "D2",
            "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1",
            "--random_seed", "0"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True, help="the start map (MRC)")
    parser.add_argument("--half-sets", type=Path, default=None,
                        help="a cryostoch refine poses.star whose rlnRandomSubset to use")
    parser.add_argument("--initial-resolution-a", type=float, default=36.2)
    parser.add_argument("--workers", type=int, default=2, help="MPI worker processes")
    parser.add_argument("--local-healpix-order", type=int, default=4,
                        help="HEALPix order from which the searches are local (4: 3.75 deg)")
    args = parser.parse_args(argv)
    if ensure_relion() is None:
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "Refine3D").mkdir(exist_ok=True)
    star = float32_copy(args.work, args.half_sets)
    command = autorefine_command(star, args.init, args.initial_resolution_a, args.workers,
                                 args.local_healpix_order)
    print(" ".join(command), flush=True)
    with open(args.work / "Refine3D" / "run.log", "w") as log:
        return subprocess.run(common.NICE + command, cwd=args.work, stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
