"""Helpers of the tests of runs under torchrun (test_distributed.py, test_cuda.py).

As a script, a reconstruction under torchrun that stops after a number of steps, as an
interrupted run would (every rank stops before the same step; rank 0 has checkpointed the one
before):

    torchrun --standalone --nproc-per-node 2 tests/distributed_support.py CONFIG.json STEPS

CONFIG.json: a `ReconstructionConfig.to_dict()`; give it checkpoint_interval_s 0 so that the
last completed step is in checkpoint.pt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import joined
from cryostoch.engine.reconstruct import Reconstruction
from cryostoch.evaluate.fsc import fourier_shell_correlation
from cryostoch.io.mrc import read_map

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def launch(processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`cryostoch ARGS` (or a script) under torchrun with `processes` processes (gloo on the
    CPU, NCCL with --device cuda); with `check`, it must succeed."""
    target = list(args) if args[0].endswith(".py") else ["-m", "cryostoch.cli.main", *args]
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes), *target]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def simulated_particles(folder: Path) -> Path:
    """particles.star of 300 box-32 phantom particles at 8 A in `folder`."""
    from cryostoch.cli.main import main

    assert main(["simulate", "--volume", "phantom", "--n-particles", "300", "--box", "32",
                 "--pixel-size-a", "8", "--seed", "5", "--out", str(folder), "--montage", "0",
                 "--quiet"]) == 0
    return folder / "particles.star"


def reconstruct_args(particles: Path, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(particles), "--out", str(out), "--epochs", "1", "--batch-size",
            "20", "--test-size", "20", "--shift-range-a", "0", "--seed", "3", "--threads", "1",
            "--quiet", *extra]


def fsc_inside_cutoff(run_a: Path, run_b: Path) -> np.ndarray:
    """FSC of the two runs' map.mrc in every shell up to the likelihood's cutoff."""
    a, _ = read_map(run_a / "map.mrc")
    b, _ = read_map(run_b / "map.mrc")
    shells, fsc = fourier_shell_correlation(a.double(), b.double())
    cutoff = json.loads((run_a / "config.json").read_text())["cutoff_radius_px"]
    return fsc[shells <= cutoff].numpy()


class Stopped(Exception):
    """Raised on every rank before step `STEPS + 1`."""


def run_and_stop(config: ReconstructionConfig, steps: int) -> None:
    with joined(config.device) as world:
        config = dataclasses.replace(config, device=world.device)
        run = Reconstruction(config, progress=False, world=world)
        step = run._step

        def counted(batch: int) -> float:
            if run.state.iteration >= steps:
                raise Stopped
            return step(batch)

        run._step = counted
        try:
            run.run()
        except Stopped:
            return
        raise AssertionError(f"the run ended before {steps} steps")


if __name__ == "__main__":
    settings = json.loads(open(sys.argv[1]).read())
    run_and_stop(ReconstructionConfig.from_dict(settings), int(sys.argv[2]))
