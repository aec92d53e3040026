"""RELION 3.1's ab initio (SGD initial model, `relion_refine --denovo_3dref --sgd`) on the
simulated set, with a reduced schedule, then its map aligned onto the truth for the FSC.

    python benchmarks/peers/relion_peer.py --work /work/peers_work [--iterations 50,0,0]

RELION comes from Debian (`apt-get install relion`, 3.1.3 on Debian 12); when relion_refine is
missing the script installs it as root, or says how. The settings are those of RELION 3.1's
InitialModel job (the tutorial's command) but for what DEFAULT_ITERATIONS explains: RELION's
50 + 200 + 50 SGD iterations take many hours on 2 cores. Results in WORK/relion/.
The Python is run with the project's environment (PYTHONPATH=src): it aligns the maps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import common

RELION_DEFAULT_ITERATIONS = (50, 200, 50)  # --sgd_ini_iter, --sgd_inbetween_iter, --sgd_fin_iter
# Measured here beside other jobs (load 8-12 on 2 cores, one thread): 0.3-0.6 s per particle
# and iteration at 35 A with 30 deg directions; with the GUI's oversampling (15 deg) twice that.
# In the in-between phase RELION raises the angular sampling with the resolution: at 29 A its
# first in-between iteration chose 7.5 deg (36,864 directions) and was to take 40 min for 125
# particles. So only the initial phase is run, at its default length: 50 iterations of 100
# particles (5,000 passes, 1.7 epochs) at 35 A, of about 90,000 passes in the default schedule.
DEFAULT_ITERATIONS = (50, 0, 0)
SUBSET_SIZES = (100, 200)  # --sgd_ini_subset, --sgd_fin_subset (RELION's default 100, 500)


def ensure_relion() -> str | None:
    """Path of relion_refine, installing Debian's package when missing and allowed; None (with
    the reason printed) when it cannot be had, so the table can say so."""
    found = shutil.which("relion_refine")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("relion_refine not found: apt-get install -y relion")
        subprocess.run(["apt-get", "update"], check=False)
        subprocess.run(["apt-get", "install", "-y", "relion"], check=False)
        return shutil.which("relion_refine")
    print("relion_refine not found: install it with `sudo apt-get install relion` (Debian 12: "
          "RELION 3.1.3, CPU build)")
    return None


def relion_command(relion: str, star: Path, iterations: tuple[int, int, int],
                   threads: int) -> list[str]:
    """RELION 3.1's InitialModel command (as its GUI writes it) for this set."""
    ini, between, fin = iterations
    return [
        relion, "--o", "sgd/run", "--i", star.name,
        "--sgd", "--denovo_3dref", "--ctf", "--K", "1", "--sym", "C1",
        "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter", str(between),
        "--sgd_fin_iter", str(fin), "--sgd_write_iter", str(max(sum(iterations), 1)),
        "--sgd_ini_resol", "35", "--sgd_fin_resol", "15",  # the GUI's
        "--sgd_ini_subset", str(SUBSET_SIZES[0]), "--sgd_fin_subset", str(SUBSET_SIZES[1]),
        "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc",
        "--pool", "30", "--pad", "1", "--skip_gridding",
        "--particle_diameter", f"{common.PARTICLE_DIAMETER_A:g}",
        # the GUI's 30 deg directions (order 1) but not its oversampled second pass (15 deg),
        # which doubled the time; the set's shifts lie within 3 px (3 sigma of 5 A at 5 A/px),
        # 95% within 2 px: +-2 px in steps of 1 px (the GUI's +-6 px for larger boxes)
        "--oversampling", "0", "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1",
        # seed 0 would switch off the shuffling of particles, so every SGD subset would be the same
        "--j", str(threads), "--random_seed", "1",
    ]


def final_map(folder: Path) -> Path:
    """The last iteration's map (run_itNNN_class001.mrc)."""
    maps = sorted(folder.glob("run_it[0-9][0-9][0-9]_class001.mrc"))
    if not maps:
        raise RuntimeError(f"RELION wrote no map in {folder}")
    return maps[-1]


def run(work: Path, star: Path, iterations: tuple[int, int, int], threads: int) -> dict:
    folder = work / "relion"
    label = "RELION 3.1 SGD initial model (relion_refine --denovo_3dref --sgd)"
    relion = ensure_relion()
    if relion is None:
        result = {"method": label, "status": "not run: relion_refine is not installed"}
        common.save_result(folder, result)
        return result
    shutil.rmtree(folder / "sgd", ignore_errors=True)  # a rerun starts clean: final_map
    (folder / "sgd").mkdir(parents=True)  # takes the last file; RELION needs the folder
    relion_star, _ = common.write_plain_copy(star, folder)
    command = relion_command(relion, relion_star, iterations, threads)
    seconds = common.run_timed(command, folder / "relion.log", cwd=folder)
    result = {
        "method": label, "wall_s": round(seconds, 1),
        "settings": (f"SGD iterations initial+in-between+final {'+'.join(map(str, iterations))}"
                     f" (RELION's default {'+'.join(map(str, RELION_DEFAULT_ITERATIONS))}; "
                     f"initial: 35 A, subsets of {SUBSET_SIZES[0]}; then to 15 A and "
                     f"{SUBSET_SIZES[1]}), healpix order 1 without oversampling (30 deg; the "
                     "GUI oversamples to 15 deg), offsets +-2 px step 1, "
                     f"diameter {common.PARTICLE_DIAMETER_A:g} A, --j {threads}"),
        "command": " ".join(command),
        "details": "float32 copy of the stack (RELION 3.1 cannot read float16), no input poses",
    }
    result.update(common.aligned_fsc(final_map(folder / "sgd"), work / "data" / "ground_truth.mrc",
                                     folder / "aligned.mrc"))
    common.save_result(folder, result)
    return result


def parse_iterations(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3 or min(values) < 0 or sum(values) == 0:
        raise argparse.ArgumentTypeError("three counts: initial,in-between,final")
    return values  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--iterations", type=parse_iterations, default=DEFAULT_ITERATIONS,
                        help="SGD iterations: initial,in-between,final (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-particles", type=int, default=3000)
    args = parser.parse_args(argv)
    star = common.simulate_set(args.work, args.n_particles)
    print(run(args.work, star, args.iterations, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
