"""cryoDRGN-AI's ab initio (`cryodrgn abinit`, cryoDRGN 4.x; `--zdim 0`: one homogeneous map)
on the simulated set, reduced to fit a CPU, then its map aligned onto the truth for the FSC.

    python benchmarks/peers/cryodrgn_ai_peer.py --work /work/peers_work [--n-images 400]

The same inputs as cryodrgn_peer.py (the float32 stack and ctf.pkl it makes, the first N
images, `--uninvert-data` for the protein-white stack), in cryoDRGN's own environment.
Results in WORK/cryodrgn_ai/.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import common
import cryodrgn_peer

LABEL = "cryoDRGN-AI 4.3.1 (cryodrgn abinit --zdim 0)"
DEFAULT_EPOCHS = 2


def abinit_command(cryodrgn: Path, stack: Path, ctf: Path, out: Path, epochs: int,
                   n_images: int, indices: Path, threads: int) -> list[str]:
    """cryoDRGN-AI's defaults but for the length and the pose grid: `epochs` in all, the
    pretraining and the pose search on the `n_images` used (defaults 10,000 and all), the first
    grid 576 rotations (healpy base 1) x 3 x 3 translations within +-2 px, as cryodrgn_peer."""
    return [str(cryodrgn), "abinit", str(stack), "--ctf", str(ctf), "-o", str(out),
            "--ind", str(indices), "--zdim", "0", "--num-epochs", str(epochs),
            "--n-imgs-pose-search", str(n_images), "--n-imgs-pretrain", str(n_images),
            "--max-threads", str(threads), "--no-amp", "--uninvert-data",
            "--base-healpy", "1", "--t-extent", "2", "--t-ngrid", "3", "--no-analysis",
            "--seed", "0"]


def last_volume(out: Path) -> Path:
    """The volume of the last epoch cryoDRGN-AI wrote (reconstruct.<epoch>.mrc)."""
    volumes = sorted(out.glob("reconstruct.*.mrc"), key=lambda p: int(p.suffixes[0][1:]))
    if not volumes:
        raise RuntimeError(f"cryodrgn abinit wrote no reconstruct.*.mrc in {out}")
    return volumes[-1]


def run(work: Path, star: Path, epochs: int, threads: int,
        n_images: int = cryodrgn_peer.DEFAULT_N_IMAGES,
        venv: Path = cryodrgn_peer.DEFAULT_VENV) -> dict:
    folder = work / "cryodrgn_ai"
    cryodrgn = cryodrgn_peer.ensure_cryodrgn(venv)
    stack, ctf = cryodrgn_peer.prepare(star, folder, cryodrgn, threads)
    indices = folder / "ind.pkl"
    with open(indices, "wb") as handle:  # a plain list: no numpy pickle across two numpys
        pickle.dump(list(range(n_images)), handle)
    out = folder / "abinit"
    command = abinit_command(cryodrgn, stack, ctf, out, epochs, n_images, indices, threads)
    timing = folder / "abinit_seconds.json"  # a finished run is measured once, not rerun
    if not (timing.is_file() and json.loads(timing.read_text())["command"] == command):
        seconds = common.run_timed(command, folder / "abinit.log",
                                   env=cryodrgn_peer.cryodrgn_env(threads))
        timing.write_text(json.dumps({"command": command, "seconds": seconds}))
    result = {
        "method": LABEL, "wall_s": round(json.loads(timing.read_text())["seconds"], 1),
        "settings": (f"the first {n_images} images only; {epochs} epochs (default 30), "
                     f"pretraining and pose search on those {n_images} (default 10,000 and "
                     "all), first pose grid 576 rotations x 3 x 3 shifts within +-2 px, "
                     f"{threads} thread(s), no AMP (CPU), --uninvert-data"),
        "command": " ".join(command),
        "details": "float32 .mrcs + ctf.pkl from parse_ctf_star, no poses; time excludes "
                   "parse_ctf_star and the stack copy",
    }
    result.update(common.aligned_fsc(last_volume(out), work / "data" / "ground_truth.mrc",
                                     folder / "aligned.mrc", voxel_size_a=common.PIXEL_SIZE_A))
    common.save_result(folder, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cryodrgn_peer.common_arguments(parser)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    star = common.simulate_set(args.work, args.n_particles)
    print(run(args.work, star, args.epochs, args.threads, args.n_images, args.venv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
