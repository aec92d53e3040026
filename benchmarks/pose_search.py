"""Pruned (coarse-to-fine) pose search against the exhaustive one, on the same images.

Example (issue 12's setting):
    python benchmarks/pose_search.py --box 64 --max-freq 0.25,0.5 --shift-radius 3

Images of the built-in phantom at known poses, with real-looking CTFs and white noise at
--snr. For every cutoff:
* exhaustive: the likelihood's full quadrature (Lebedev directions x in-plane x shifts) at the
  cutoff; its most probable pose and its negative log marginal likelihood (NLL);
* pruned: the exhaustive search at a third of the cutoff (a few Fourier pixels, cheap), whose
  --top-k most probable poses per image each start a local round (`model/local_search.py`:
  27 rotations x 9 shifts around it, at half the coarse steps, at the full cutoff); the start
  whose round holds the most evidence goes on alone through rounds with steps halved each
  round down to half the exhaustive grid's steps, and a last wider local round (+-2 steps per
  axis, 125 rotations x 25 shifts; --final-extent) whose candidates, weighted by their share
  of the Haar measure and of the shift prior, give the NLL of the same integral.
Prints seconds per image of both, the speed-up, the share of images whose best poses agree
within one step of the exhaustive grid (rotation and shift), and the mean |NLL difference|,
all measured in this run. The local rounds take the images in chunks within refine's CPU
memory budget (`model.local_search.CPU_CHUNK_BYTES`). `--device cuda` runs both searches on a GPU
(the images are made on the CPU).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cryostoch.fourier.grids import half_plane_coefficients
from cryostoch.fourier.spectrum import oversampled_volume_spectrum
from cryostoch.geometry.quadrature import (
    angular_step_rad,
    default_shift_step_px,
    max_radius_px,
    shift_quadrature,
)
from cryostoch.geometry.rotations import euler_to_matrix, geodesic_angle_rad, random_rotations
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.local_search import (
    ImageBatch,
    best_of_starts,
    candidate_rotations,
    chunk_rows,
    local_scores,
    rotation_offsets,
    shift_offsets,
)
from cryostoch.operators.ctf import CtfParameters, evaluate_ctf
from cryostoch.simulate.particles import ProjectionModel
from cryostoch.simulate.phantom import phantom_volume
from likelihood import synchronise  # benchmarks/ is on a script's path

PIXEL_A = 4.0


def make_images(box: int, n: int, snr: float, shift_radius: float, seed: int):
    """(images (n, N, N), true rotations (n, 3, 3), true shifts (n, 2), CTFs, the volume)."""
    g = torch.Generator().manual_seed(seed)
    volume = phantom_volume(box, PIXEL_A).to(torch.float64)
    rotations = random_rotations(n, generator=g, dtype=torch.float64)
    radius = shift_radius * torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64))
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    shifts = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    defocus = 10000 + 15000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = CtfParameters.from_values(n, defocus_u_a=defocus, defocus_v_a=defocus - 300,
                                    defocus_angle_deg=30.0, voltage_kv=300.0,
                                    spherical_aberration_mm=2.7, amplitude_contrast=0.1)
    clean = ProjectionModel(volume, PIXEL_A).images(rotations, ctf, shifts)
    scale = math.sqrt(snr / float(clean.var()))  # white noise of sigma 1 at this SNR
    noisy = clean * scale + torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return noisy, rotations, shifts, ctf, volume * scale


def exhaustive(volume, images, ctf, box, radius, shift_radius, device, top_k=1):
    """(best rotations (n, 3, 3), best shifts (n, 2), NLL (n,), seconds, model), on the
    CPU; with top_k > 1 the rotations (n, K, 3, 3) and shifts (n, K, 2) of the K most
    probable poses."""
    config = LikelihoodConfig(box_size=box, pixel_size_a=PIXEL_A, max_radius_px=radius,
                              shift_radius_px=shift_radius, memory_budget_mb=512.0)
    model = MarginalLikelihood(config, dtype=torch.float32, device=device)
    synchronise(device)
    start = time.perf_counter()
    with torch.no_grad():
        slices = model.slices(volume.float().to(device))
        result = model.evaluate(slices, model.image_blocks(images.float().to(device)), ctf,
                                top_k=top_k)
    synchronise(device)
    seconds = time.perf_counter() - start
    if top_k > 1:
        index = result.top_pose_index
        euler, shifts = model.pose_parameters(index.flatten())
        return (euler_to_matrix(euler.cpu()).view(*index.shape, 3, 3),
                shifts.cpu().view(*index.shape, 2), result.nll.double().cpu(), seconds, model)
    euler, shifts = model.pose_parameters(result.best_pose_index)
    return (euler_to_matrix(euler.cpu()), shifts.cpu(), result.nll.double().cpu(), seconds,
            model)


def local_batch(images, ctf, box, radius, device):
    """ImageBatch (white noise of sigma 1) on `device` at the half-plane points inside
    `radius`."""
    from cryostoch.fourier.transforms import rfft2c

    points = half_plane_coefficients(box, radius)
    rows, cols = points.rfft_indices()
    coefficients = rfft2c(images)[:, rows, cols].to(torch.complex64)
    scale = 1.0 / (box * PIXEL_A)
    c = evaluate_ctf(ctf, (points.kx * scale)[None], (points.ky * scale)[None]).float()
    weights = points.weights.float().expand(images.shape[0], -1).contiguous()
    return points, ImageBatch(coefficients.to(device), c.to(device), weights.to(device))


def local_round(block, points, batch, box, rotations, shifts, angle_step, shift_step, extent,
                shift_log_density):
    """One local round: (best rotations, best shifts, log sum of weighted candidates)."""
    device = rotations.device
    offsets = rotation_offsets(angle_step, extent, device=device)
    t_offsets = shift_offsets(shift_step, extent, device=device)
    cands = candidate_rotations(rotations, offsets)
    cand_shifts = shifts.unsqueeze(1) + t_offsets
    # each candidate's share of the prior: Haar measure (8 pi^2 in rotation-vector volume)
    # times the shift prior's density, over the cell of the local grid
    log_prior = shift_log_density(cand_shifts) + 2 * math.log(shift_step)
    scores = local_scores(block, 2, points.kx.float().to(device), points.ky.float().to(device),
                          box, batch, cands, cand_shifts, log_prior)
    best = scores.logits.flatten(1).argmax(1)
    pick = torch.arange(len(best), device=device)
    j, s = best // t_offsets.shape[0], best % t_offsets.shape[0]
    log_rotation_weight = 3 * math.log(angle_step) - math.log(8 * math.pi**2)
    evidence = scores.log_evidence().double() + log_rotation_weight
    return cands[pick, j], cand_shifts[pick, s], evidence, batch.data_norm().double()


def best_start(block, points, batch, box, rotations, shifts, angle, shift_step,
               shift_log_density):
    """One local round around each of K starts per image, (n, K, 3, 3) and (n, K, 2): the
    best pose of the start whose round holds the most evidence, ((n, 3, 3), (n, 2))."""
    device = rotations.device
    kx, ky = points.kx.float().to(device), points.ky.float().to(device)

    def score(images, candidates, candidate_shifts):
        log_prior = shift_log_density(candidate_shifts) + 2 * math.log(shift_step)
        return local_scores(block, 2, kx, ky, box, images, candidates, candidate_shifts,
                            log_prior)

    rot, sh, _ = best_of_starts(score, batch, rotations, shifts, angle, shift_step)
    return rot, sh


def local_stages(block, points, batch, box, radius, rot, shifts, coarse_steps,
                 shift_log_density, final_extent=2):
    """The local rounds of `pruned` for b images with K starts each ((b, K, 3, 3), (b, K, 2))
    from the coarse grid's (angle rad, shift px) steps: ((b, 3, 3), (b, 2), (b,) NLL); the
    last round spans +-final_extent steps per axis, whose candidates give the NLL."""
    angle, shift_step = coarse_steps
    fine_angle, fine_shift = angular_step_rad(radius), box / (2 * math.pi * radius)
    angle, shift_step = max(angle / 2, fine_angle / 2), max(shift_step / 2, fine_shift / 2)
    rot, shifts = best_start(block, points, batch, box, rot, shifts, angle, shift_step,
                             shift_log_density)
    while angle > fine_angle / 2 or shift_step > fine_shift / 2:
        angle, shift_step = max(angle / 2, fine_angle / 2), max(shift_step / 2, fine_shift / 2)
        rot, shifts, _, _ = local_round(block, points, batch, box, rot, shifts, angle,
                                        shift_step, 1, shift_log_density)
    rot_e, shifts_e, evidence, data_norm = local_round(
        block, points, batch, box, rot, shifts, angle, shift_step, final_extent, shift_log_density)
    normaliser = 0.5 * points.degrees_of_freedom * math.log(2 * math.pi)
    return rot, shifts, data_norm - evidence + normaliser


def pruned(volume, images, ctf, box, radius, shift_radius, device, top_k=8, final_extent=2):
    """Coarse exhaustive search (its top_k poses), then local rounds: (rotations, shifts,
    NLL, seconds), on the CPU."""
    coarse_radius = max(4.0, radius / 3)
    rot, shifts, _, coarse_seconds, coarse = exhaustive(volume, images, ctf, box, coarse_radius,
                                                        shift_radius, device,
                                                        top_k=max(2, top_k))
    rot, shifts = rot[:, :top_k], shifts[:, :top_k]
    synchronise(device)
    start = time.perf_counter()
    quad = coarse.shifts
    sigma_free = shift_quadrature(shift_radius, 0.05, math.inf)  # the prior's density
    log_area = math.log(0.05**2) + float(-sigma_free.log_weights[0])

    def shift_log_density(t):
        inside = t.norm(dim=-1) <= shift_radius + 1e-9
        return torch.where(inside, -log_area, -math.inf)

    points, batch = local_batch(images, ctf, box, radius, device)
    block, _ = oversampled_volume_spectrum(volume.float().to(device), radius + 0.5, 2)
    steps = (angular_step_rad(coarse_radius), float(torch.cdist(
        quad.shifts_px, quad.shifts_px).masked_fill(torch.eye(
            quad.size, dtype=torch.bool, device=quad.shifts_px.device), math.inf).min())
        if quad.size > 1 else 1.0)
    rot, shifts = rot.double().to(device), shifts.double().to(device)
    # in chunks whose widest round's slices stay within refine's CPU budget (larger
    # temporaries are page-faulted anew each time); accelerators take all at once
    size = chunk_rows(device, torch.float32, max(27 * top_k, (2 * final_extent + 1) ** 3),
                      points.n_points, len(rot))
    parts = [local_stages(block, points, ImageBatch(*(x[c] for x in (
        batch.coefficients, batch.ctf, batch.weighted_precision))), box, radius, rot[c],
        shifts[c], steps, shift_log_density, final_extent)
        for c in torch.arange(len(rot), device=device).split(size)]
    rot, shifts, nll = (torch.cat(x) for x in zip(*parts, strict=True))
    synchronise(device)
    return (rot.cpu(), shifts.cpu(), nll.cpu(), coarse_seconds + time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--max-freq", default="0.25,0.5",
                        help="cutoffs as fractions of Nyquist, comma-separated")
    parser.add_argument("--shift-radius", type=float, default=3.0, help="pixels")
    parser.add_argument("--n-images", type=int, default=24)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--top-k", type=int, default=8,
                        help="coarse poses per image that start a local round")
    parser.add_argument("--final-extent", type=int, default=2,
                        help="the last local round (whose candidates give the NLL) spans "
                             "+-this many half-fine steps per axis (3: 343 x 49 candidates)")
    parser.add_argument("--verbose", action="store_true", help="per-image differences")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, _, _, ctf, volume = make_images(args.box, args.n_images, args.snr,
                                            args.shift_radius, args.seed)
    print(f"box {args.box}, {args.n_images} images, SNR {args.snr}, shifts within "
          f"{args.shift_radius} px, {args.top_k} coarse poses per image, {device}, torch "
          f"threads {torch.get_num_threads()}")
    print("| cutoff (Nyquist) | radius px | exhaustive poses | exhaustive s/image | "
          "pruned s/image | speed-up | best pose agrees | mean abs NLL diff | mean NLL diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fraction in (float(v) for v in args.max_freq.split(",")):
        radius = max_radius_px(args.box, fraction)
        rot_x, sh_x, nll_x, sec_x, model = exhaustive(volume, images, ctf, args.box, radius,
                                                      args.shift_radius, device)
        rot_p, sh_p, nll_p, sec_p = pruned(volume, images, ctf, args.box, radius,
                                           args.shift_radius, device, args.top_k,
                                           args.final_extent)
        step_deg = math.degrees(angular_step_rad(radius))
        shift_step = default_shift_step_px(args.box, radius)
        angle_deg = torch.rad2deg(geodesic_angle_rad(rot_x.double(), rot_p.double()))
        agree = ((angle_deg <= 1.5 * step_deg)
                 & ((sh_x.double() - sh_p.double()).norm(dim=1) <= 1.5 * shift_step))
        diff = nll_p - nll_x
        if args.verbose:
            print("per-image NLL diff", [round(v, 2) for v in diff.tolist()],
                  "agree", agree.tolist())
        n = args.n_images
        print(f"| {fraction:.2f} | {radius:.1f} | {model.quadrature_size:,} | {sec_x / n:.3f} | "
              f"{sec_p / n:.4f} | {sec_x / sec_p:.0f}x | {float(agree.double().mean()):.0%} | "
              f"{float(diff.abs().mean()):.2f} | {float(diff.mean()):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
