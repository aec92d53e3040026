"""cryoDRGN's homogeneous ab initio (`cryodrgn abinit_homo_old`, the `abinit_homo` of cryoDRGN
2-3, renamed in 4.x) on the simulated set, with few epochs, then its map aligned onto the
truth for the FSC.

    python benchmarks/peers/cryodrgn_peer.py --work /work/peers_work [--epochs 1 --n-images 400]

cryoDRGN runs from its own virtual environment (setup_cryodrgn.sh, default /work/peers-venv),
never the project's. Its inputs are made here from the simulated set: a float32 .mrcs stack
and ctf.pkl (`cryodrgn parse_ctf_star`); poses are not given (ab initio). Results in
WORK/cryodrgn/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path("/work/peers-venv")
# Measured here beside other jobs (load 8-12 on 2 cores, one thread): 0.4-0.75 s per image for
# the random-pose pretraining and over 2.5 s per image for a pose-search epoch even on a coarse
# grid, so cryoDRGN's defaults (10,000 pretraining images, 30 epochs with a pose search every
# 5, on all 3,000 images) would take a day. Reduced to what fits in about 20 minutes: the first
# 400 images, pretrained on 400, one pose-search epoch on the coarse grid below.
DEFAULT_EPOCHS = 1
DEFAULT_PRETRAIN_IMAGES = 400
DEFAULT_N_IMAGES = 400


def ensure_cryodrgn(venv: Path) -> Path:
    """The cryodrgn executable, creating the virtual environment when it is missing."""
    subprocess.run(["bash", str(HERE / "setup_cryodrgn.sh"), str(venv)], check=True)
    return venv / "bin" / "cryodrgn"


def cryodrgn_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = str(threads)  # torch's CPU threads in cryoDRGN
    return env


def abinit_command(cryodrgn: Path, stack: Path, ctf: Path, out: Path, epochs: int,
                   pretrain_images: int, indices: Path) -> list[str]:
    """cryoDRGN's defaults but for the length and the pose grid: the frequency ramp (12 to 32
    px) is spread over the epochs given instead of 25; the first grid has 576 rotations (healpy
    base 1, not 2: 8x fewer) and 3 x 3 translations within +-2 px (the set's shifts lie within
    3 px, 95% within 2), refined by cryoDRGN's 4 subdivisions. `--uninvert-data`: cryoDRGN
    negates images by default (it expects raw micrograph contrast, protein dark), but the
    simulated stack is written protein-white, as RELION's extracted particles are; without it
    the map comes out with inverted density (FSC -0.57 at the first shell, measured)."""
    return [str(cryodrgn), "abinit_homo_old", str(stack), "--ctf", str(ctf), "-o", str(out),
            "--ind", str(indices), "-n", str(epochs),
            "--l-ramp-epochs", str(max(epochs - 1, 1)), "--pretrain", str(pretrain_images),
            "--base-healpy", "1", "--t-extent", "2", "--t-ngrid", "3", "--seed", "0", "--no-amp",
            "--uninvert-data", "--log-interval", "96"]


def prepare(star: Path, folder: Path, cryodrgn: Path, threads: int) -> tuple[Path, Path]:
    """A float32 stack and ctf.pkl, as cryoDRGN reads them."""
    plain_star, stack = common.write_plain_copy(star, folder)
    ctf = folder / "ctf.pkl"
    common.run_timed([str(cryodrgn), "parse_ctf_star", str(plain_star), "-o", str(ctf),
                      "-D", str(common.BOX_PX), "--Apix", f"{common.PIXEL_SIZE_A:g}"],
                     folder / "parse_ctf_star.log", env=cryodrgn_env(threads))
    return stack, ctf


def run(work: Path, star: Path, epochs: int, pretrain_images: int, threads: int,
        n_images: int = DEFAULT_N_IMAGES, venv: Path = DEFAULT_VENV) -> dict:
    import json
    import pickle

    folder = work / "cryodrgn"
    label = "cryoDRGN 4.3.1 abinit_homo_old (cryodrgn abinit_homo)"
    cryodrgn = ensure_cryodrgn(venv)
    stack, ctf = prepare(star, folder, cryodrgn, threads)
    indices = folder / "ind.pkl"
    with open(indices, "wb") as handle:  # a plain list: no numpy pickle across two numpys
        pickle.dump(list(range(n_images)), handle)
    out = folder / "abinit"
    command = abinit_command(cryodrgn, stack, ctf, out, epochs, pretrain_images, indices)
    timing = folder / "abinit_seconds.json"  # a finished run is measured once, not rerun
    if not ((out / "reconstruct.mrc").is_file() and timing.is_file()
            and json.loads(timing.read_text())["command"] == command):
        seconds = common.run_timed(command, folder / "abinit.log", env=cryodrgn_env(threads))
        timing.write_text(json.dumps({"command": command, "seconds": seconds}))
    seconds = json.loads(timing.read_text())["seconds"]
    result = {
        "method": label, "wall_s": round(seconds, 1),
        "settings": (f"the first {n_images} images only; {epochs} epoch(s) (default 30) with "
                     f"a pose search in the first, pretrain {pretrain_images} images (default "
                     "10,000), first pose grid 576 rotations x 3 x 3 shifts within +-2 px "
                     f"(default 4,608 x 7 x 7 within +-10), {threads} thread(s), no AMP (CPU)"),
        "command": " ".join(command),
        "details": "float32 .mrcs + ctf.pkl from parse_ctf_star, no poses, --uninvert-data "
                   "(the stack is protein-white); time excludes "
                   "parse_ctf_star and the stack copy",
    }
    # the map's header holds cryoDRGN's own Apix guess: the data's pixel size is given instead
    result.update(common.aligned_fsc(out / "reconstruct.mrc", work / "data" / "ground_truth.mrc",
                                     folder / "aligned.mrc", voxel_size_a=common.PIXEL_SIZE_A))
    common.save_result(folder, result)
    return result


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both cryoDRGN scripts take."""
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-images", type=int, default=DEFAULT_N_IMAGES,
                        help="train on the first N images of the set")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--n-particles", type=int, default=3000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--pretrain-images", type=int, default=DEFAULT_PRETRAIN_IMAGES,
                        help="images trained on with random poses first (cryoDRGN's: 10000)")
    args = parser.parse_args(argv)
    star = common.simulate_set(args.work, args.n_particles)
    print(run(args.work, star, args.epochs, args.pretrain_images, args.threads, args.n_images,
              args.venv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
