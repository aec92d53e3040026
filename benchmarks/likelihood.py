"""Time the marginal likelihood + gradient for one minibatch and compare with a plain matmul.

Example (the paper's synthetic configuration):
    python benchmarks/likelihood.py --box 128 --max-freq 0.10 --batch-size 100
The real-data configuration with shift marginalisation:
    python benchmarks/likelihood.py --box 128 --max-freq 0.16 --shift-radius 4 --batch-size 100

Prints the quadrature size, median time per minibatch for objective + gradient, the GEMM
FLOPs the exhaustive evaluation needs, the achieved GFLOP/s, the GFLOP/s of a plain torch
matmul of the same shape measured in the same run, their ratio, the projected time of one
epoch of 50,000 images, and the peak memory.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch

from cryostoch.geometry.quadrature import max_radius_px
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig
from cryostoch.operators.ctf import CtfParameters


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def likelihood_gemm_flops(model: MarginalLikelihood, with_gradient: bool = True) -> float:
    """Multiply-adds x 2 of the GEMMs that one image costs in an exhaustive evaluation."""
    d, p, t, m = model.n_directions, model.n_inplane, model.n_shifts, model.n_points
    forward = 2 * (p * t * 2 * m * d + p * m * d)
    return float(forward * (2 if with_gradient else 1))


def volume_dft_flops(model: MarginalLikelihood, with_gradient: bool = True) -> float:
    """FLOPs of the pruned volume DFT's GEMMs per evaluation (independent of batch size)."""
    n = model.config.box_size
    layout = model.volume_side.layout
    k, kx = layout.centred_length, layout.half_length
    forward = 2 * n**3 * 2 * kx + 8 * k * n * n * kx + 8 * k * n * k * kx
    return float(forward * (2 if with_gradient else 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--max-freq", type=float, default=0.10, help="fraction of Nyquist")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--shift-radius", type=float, default=0.0, help="pixels; 0 = no shifts")
    parser.add_argument("--shift-step", type=float, default=None, help="pixels (default: auto)")
    parser.add_argument("--pixel-size", type=float, default=2.8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epoch-images", type=int, default=50_000)
    parser.add_argument("--memory-budget-mb", type=float, default=256.0)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    radius = max_radius_px(args.box, args.max_freq)
    config = LikelihoodConfig(
        box_size=args.box,
        pixel_size_a=args.pixel_size,
        max_radius_px=radius,
        shift_radius_px=args.shift_radius,
        shift_step_px=args.shift_step,
        shift_sigma_px=max(args.shift_radius, 1.0),
        memory_budget_mb=args.memory_budget_mb,
    )
    model = MarginalLikelihood(config, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(args.box, args.box, args.box, generator=g).to(device, dtype)
    images = torch.randn(args.batch_size, args.box, args.box, generator=g).to(device, dtype)
    blocks = model.image_blocks(images)
    n = args.batch_size
    ctf = CtfParameters.from_values(
        n,
        defocus_u_a=15000.0 + 5000 * torch.rand(n, generator=g, dtype=torch.float64),
        defocus_v_a=14500.0 + 5000 * torch.rand(n, generator=g, dtype=torch.float64),
        defocus_angle_deg=30.0,
        voltage_kv=300.0,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
    )
    prior = PriorConfig()

    def step():
        minibatch_objective(volume, blocks, ctf, model, prior, 50_000)

    seconds = median_time(step, device, args.repeats)
    flops = likelihood_gemm_flops(model) * n
    achieved = flops / seconds / 1e9
    all_flops = flops + volume_dft_flops(model)
    achieved_all = all_flops / seconds / 1e9

    # the dominant GEMM shape: (batch * P * T, 2M) x (2M, D), timed plainly
    rows = n * model.n_inplane * model.n_shifts
    rows = min(rows, model.kernel.chunk_sizes(n)[0] * model.n_inplane * model.n_shifts)
    a = torch.randn(rows, 2 * model.n_points, generator=g).to(device, dtype)
    b = torch.randn(2 * model.n_points, model.n_directions, generator=g).to(device, dtype)
    matmul_seconds = median_time(lambda: a @ b, device, max(args.repeats, 5))
    matmul_gflops = 2 * rows * 2 * model.n_points * model.n_directions / matmul_seconds / 1e9

    steps_per_epoch = math.ceil(args.epoch_images / n)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"configuration: box {args.box}, cutoff {args.max_freq:.2f} Nyquist "
          f"(radius {radius:.2f} px), batch {n}, {args.dtype} on {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"quadrature: {model.n_directions} directions x {model.n_inplane} in-plane x "
          f"{model.n_shifts} shifts = {model.quadrature_size} points; "
          f"{model.n_points} half-plane coefficients")
    print(f"time per minibatch (objective + gradient, median of {args.repeats}): "
          f"{seconds * 1e3:.1f} ms")
    print(f"likelihood GEMM work per minibatch: {flops / 1e9:.2f} GFLOP; "
          f"achieved {achieved:.1f} GFLOP/s")
    print(f"all GEMM work (likelihood + pruned volume DFT and its adjoint): "
          f"{all_flops / 1e9:.2f} GFLOP; achieved {achieved_all:.1f} GFLOP/s")
    print(f"plain matmul ({rows} x {2 * model.n_points} x {model.n_directions}): "
          f"{matmul_gflops:.1f} GFLOP/s")
    print(f"ratio achieved / plain matmul (all GEMMs): {achieved_all / matmul_gflops:.2f}")
    print(f"ratio achieved / plain matmul (likelihood GEMMs only): "
          f"{achieved / matmul_gflops:.2f}")
    print(f"projected epoch of {args.epoch_images} images: {seconds * steps_per_epoch:.1f} s "
          f"({steps_per_epoch} minibatches)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    print(f"peak resident memory: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
