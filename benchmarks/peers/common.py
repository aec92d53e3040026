"""What every peer script shares: the simulated set's settings, timed commands, the
particle copies peers can read, and the aligned FSC against the truth.

Runs with the project's Python (it imports cryostoch); the peers themselves run as separate
programs (RELION from Debian, cryoDRGN from its own virtual environment), never imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():  # the helper worktrees sit beside main, whose ../shared is /work/shared
    DATA = Path("/work/shared/data")
NICE = ["nice", "-n", "5"]  # the machine is shared: heavy steps yield to interactive work

# The simulated set (the README's synthetic check, smaller): the SARS-CoV-2 spike at 5 A/px,
# real EMPIAR-10049 CTFs, SNR 0.05, the real beta-galactosidase background as coloured noise,
# shifts of sigma 5 A.
PIXEL_SIZE_A = 5.0
BOX_PX = 64
PARTICLE_DIAMETER_A = 0.8 * BOX_PX * PIXEL_SIZE_A  # cryostoch's default, given to every peer


def cryostoch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cryostoch.cli.main", *args]


def cryostoch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def simulate_set(work: Path, n_particles: int, seed: int = 0) -> Path:
    """Simulate the set once into work/data (kept between runs); returns its STAR file."""
    out = work / "data"
    star = out / "particles.star"
    if (out / "simulation.json").is_file():
        print(f"simulated set: reusing {out}")
        return star
    command = cryostoch_command(
        "simulate", "--volume", str(DATA / "structures" / "6vyb.pdb"),
        "--n-particles", str(n_particles), "--box", str(BOX_PX),
        "--pixel-size-a", str(PIXEL_SIZE_A),
        "--ctf-table", str(DATA / "ctf" / "empiar10049_ctf.star"), "--snr", "0.05",
        "--noise-from", str(DATA / "betagal_empiar10204" / "Extract" / "job009" / "particles.star"),
        "--shift-sigma-a", "5", "--seed", str(seed), "--out", str(out), "--quiet", "--overwrite")
    run_timed(command, work / "simulate.log", env=cryostoch_env())
    return star


def run_timed(command: list[str], log: Path, *, env: dict[str, str] | None = None,
              cwd: Path | None = None, nice: bool = True) -> float:
    """Run `command` with its output in `log`; the wall time in seconds. A failure raises with
    the log's tail, so the driver can record the peer as failed and go on."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = (NICE if nice and shutil.which("nice") else []) + command
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(full) + "\n")
        handle.flush()
        done = subprocess.run(full, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{command[0]} exited {done.returncode} (log {log}):\n{tail}")
    return seconds


def write_plain_copy(star: Path, out_dir: Path) -> tuple[Path, Path]:
    """A float32 stack and a STAR file without poses for the peers.

    RELION 3.1 cannot read float16 (MRC mode 12) stacks, and both peers start ab initio: the
    ground-truth angles and offsets in the simulated STAR are dropped so that nothing of the
    answer leaks (RELION starts its offset search from rlnOriginX/YAngst). Returns (STAR, stack).
    """
    import mrcfile
    import numpy as np

    from cryostoch.io.star import read_star, split_particle_blocks, write_particles_star

    optics, particles = split_particle_blocks(star, read_star(star))
    stacks = particles["rlnImageName"].str.split("@", n=1).str[1].unique()
    if len(stacks) != 1:
        raise ValueError(f"{star}: expected one image stack, found {len(stacks)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stack_out = out_dir / "particles_f32.mrcs"
    with mrcfile.mmap(star.parent / stacks[0], mode="r", permissive=True) as source:
        images = np.asarray(source.data, dtype=np.float32)
        voxel = float(source.voxel_size.x)
    with mrcfile.new(stack_out, overwrite=True) as target:
        target.set_data(images)
        target.set_image_stack()
        target.voxel_size = voxel
    index = particles["rlnImageName"].str.split("@", n=1).str[0]
    plain = particles.drop(columns=[c for c in particles.columns if c.startswith(
        ("rlnAngle", "rlnOrigin", "rlnCryostoch"))])
    plain["rlnImageName"] = index + "@" + stack_out.name
    star_out = out_dir / "particles_f32.star"
    write_particles_star(star_out, optics, plain)
    return star_out, stack_out


def aligned_fsc(map_path: Path, truth_path: Path, aligned_out: Path,
                voxel_size_a: float | None = None) -> dict:
    """Superimpose the map on the truth (rotation, shift and hand: ab initio maps come in
    either) with `cryostoch align`'s aligner; FSC 0.5 and 0.143 against the truth."""
    import torch

    from cryostoch.evaluate.superimpose import align_onto
    from cryostoch.io.mrc import read_map, write_map

    truth, truth_pixel = read_map(truth_path)
    volume, pixel = read_map(map_path)
    pixel = voxel_size_a or pixel  # cryoDRGN's maps carry no voxel size of the data
    result = align_onto(truth.double(), volume.double(), pixel_size_a=truth_pixel,
                        moving_pixel_size_a=pixel, allow_mirror=True,
                        generator=torch.Generator().manual_seed(0))
    write_map(aligned_out, result.volume.float(), truth_pixel)
    fsc = result.fsc
    return {"fsc05_a": _crossing(fsc, 0.5), "fsc0143_a": _crossing(fsc, 0.143),
            "mirrored": bool(result.alignment.mirrored), "nyquist_a": fsc.nyquist_a,
            "map": str(map_path), "aligned_map": str(aligned_out)}


def _crossing(fsc, threshold: float) -> float | None:
    """Resolution at the threshold; None when the curve never crosses it (then the
    table says 'Nyquist or better' rather than a number the curve does not give)."""
    return round(fsc.resolution_at(threshold), 1) if fsc.crosses(threshold) else None


def save_result(folder: Path, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def load_result(folder: Path) -> dict | None:
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None
