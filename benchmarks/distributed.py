"""Data parallel throughput: the same reconstruction with 1 and more processes (torchrun),
and the scaling that the communication volume and the per-step compute predict.

Example (this machine: 2 CPU cores):
    python benchmarks/distributed.py --box 64 --n-particles 1000 --processes 1,2
On a node with GPUs (one process a GPU, NCCL):
    python benchmarks/distributed.py --device cuda --box 128 --n-particles 20000 --processes 1,2,4

Measured in one run, in this order:
1. per-step compute of `minibatch_objective` at the run's cutoff, split into a fixed part F
   (volume DFT, slices, their adjoint, prior: done by every rank whatever its share) and a
   per-image part c, from the median times at B and B/2 images: c = 2 (t_B - t_B/2) / B;
2. the all-reduce of one map gradient (box^3 float32) between 2 processes (gloo or NCCL),
   A seconds;
3. `cryostoch reconstruct` under `torchrun --nproc-per-node P` for every P, images/s of its
   optimisation loop (metrics.csv: gradient evaluations over seconds, first to last row),
   without frequency marching so that every step works at the cutoff of 1. (the loop also
   scores the held-out images now and then, and calibrates the step once).
Prints them and the model's speed-up S(P) = (F + B c) / (F + B c / P + A) beside the measured
one. Processes share the machine's cores: with P processes of `--threads` threads each on
fewer cores than P x threads, the measured speed-up shows the contention, not the method.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from likelihood import median_time  # benchmarks/ is on a script's path

TORCHRUN = Path(sys.executable).parent / "torchrun"


def step_cost(box: int, radius_px: float, batch: int, device: str,
              repeats: int) -> tuple[float, float]:
    """(fixed seconds per step F, seconds per image c) of objective + gradient, float32."""
    from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
    from cryostoch.model.objective import minibatch_objective
    from cryostoch.model.prior import PriorConfig
    from cryostoch.operators.ctf import CtfParameters

    dev = torch.device(device)
    model = MarginalLikelihood(LikelihoodConfig(box_size=box, pixel_size_a=4.0,
                                                max_radius_px=radius_px), device=dev)
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(box, box, box, generator=g).to(dev)
    blocks = model.image_blocks(torch.randn(batch, box, box, generator=g).to(dev))
    ctf = CtfParameters.from_values(batch, defocus_u_a=15000.0, defocus_v_a=14500.0,
                                    defocus_angle_deg=30.0, voltage_kv=300.0,
                                    spherical_aberration_mm=2.7, amplitude_contrast=0.1)
    half = batch // 2
    times = [median_time(lambda b=b: minibatch_objective(
        volume, blocks[:b], ctf.index(slice(0, b)), model, PriorConfig(), 50_000), dev, repeats)
        for b in (half, batch)]
    per_image = (times[1] - times[0]) / (batch - half)
    return max(times[1] - batch * per_image, 0.0), per_image


def allreduce_worker(box: int, repeats: int) -> None:
    """Under torchrun: time the all-reduce of a box^3 float32 gradient; rank 0 prints it."""
    import torch.distributed as dist

    cuda = os.environ.get("BENCH_DEVICE", "cpu").startswith("cuda")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    gradient = torch.ones(box, box, box, device=device)
    seconds = median_time(lambda: dist.all_reduce(gradient), device, repeats)
    if dist.get_rank() == 0:
        print(f"ALLREDUCE {seconds!r}", flush=True)
    dist.destroy_process_group()


def torchrun(processes: int, args: list[str], device: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DEVICE": device}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes),
                           *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"torchrun failed:\n{done.stderr[-3000:]}")
    return done.stdout


def loop_throughput(metrics: Path) -> tuple[float, int]:
    """(images per second of the optimisation loop, steps) from a run's metrics.csv."""
    rows = list(csv.DictReader(open(metrics)))
    images = int(rows[-1]["gradient_evaluations"]) - int(rows[0]["gradient_evaluations"])
    seconds = float(rows[-1]["seconds"]) - float(rows[0]["seconds"])
    return images / seconds, len(rows) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--n-particles", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-freq", type=float, default=None,
                        help="likelihood cutoff, fraction of Nyquist (default: reconstruct's)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU a process)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        return allreduce_worker(args.box, args.repeats)
    torch.set_num_threads(args.threads)
    counts = [int(p) for p in args.processes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cryostoch-distributed-"))
    cli = ["-m", "cryostoch.cli.main"]
    subprocess.run([sys.executable, *cli, "simulate", "--volume", "phantom", "--n-particles",
                    str(args.n_particles), "--box", str(args.box), "--pixel-size-a",
                    str(256 / args.box), "--out", str(work / "sim"), "--montage", "0",
                    "--quiet"], check=True, capture_output=True)
    measured = {}
    for p in counts:
        out = work / f"ranks{p}"
        torchrun(p, [*cli, "reconstruct", str(work / "sim" / "particles.star"), "--out",
                     str(out), "--epochs", str(args.epochs), "--batch-size",
                     str(args.batch_size), "--test-size", "20", "--shift-range-a", "0",
                     "--device", args.device, "--threads", str(args.threads), "--quiet",
                     "--start-freq-fraction", "1",  # every step at the cutoff step_cost times
                     *([] if args.max_freq is None else ["--max-freq", str(args.max_freq)])],
                 args.device)
        measured[p] = loop_throughput(out / "metrics.csv")
    info = json.loads((work / f"ranks{counts[0]}" / "config.json").read_text())
    radius = float(info["cutoff_radius_px"])
    fixed, per_image = step_cost(args.box, radius, args.batch_size, args.device, args.repeats)
    out = torchrun(2, [__file__, "--allreduce-worker", "--box", str(args.box), "--repeats",
                       str(args.repeats)], args.device)
    allreduce = float(out.split("ALLREDUCE")[-1])
    b = args.batch_size
    print(f"box {args.box}, cutoff radius {radius:.2f} px, minibatch {b}, {args.device}, "
          f"{args.threads} thread(s) a process, {os.cpu_count()} CPU cores (load average "
          f"{os.getloadavg()[0]:.1f} at the end); sgd: one gradient (one all-reduce) a step")
    print(f"per step: fixed {fixed * 1e3:.1f} ms + {per_image * 1e3:.2f} ms an image "
          f"(whole minibatch {(fixed + b * per_image) * 1e3:.1f} ms); all-reduce of the "
          f"{4 * args.box**3 / 1e6:.1f} MB gradient between 2 processes {allreduce * 1e3:.2f} ms")
    print("| processes | steps | images/s (loop) | speed-up | model S(P) |")
    print("|---|---|---|---|---|")
    base = measured[counts[0]][0] / counts[0]  # images/s of one process (if counts[0] is 1)
    for p in counts:
        model = (fixed + b * per_image) / (fixed + b * per_image / p + (allreduce if p > 1
                                                                         else 0.0))
        print(f"| {p} | {measured[p][1]} | {measured[p][0]:.1f} | {measured[p][0] / base:.2f} | "
              f"{model:.2f} |")


if __name__ == "__main__":
    main()
