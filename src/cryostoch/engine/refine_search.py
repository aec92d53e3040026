"""Refinement's later global searches: exhaustive at an affordable cutoff, or coarse-to-fine.

Local searches cannot walk a pose that the first exhaustive search (at the start map's
cutoff, ~50 A) put far from the truth: on a pseudo-symmetric particle (the simulated spike,
nearly C3 and cylinder-like at low resolution) even the true map puts only 12% of the
particles within two grid steps of their pose at 51 A, against 77% at 30 A
(`benchmarks/pose_recovery.py`, README). Once the half
maps resolve finer detail, each half is searched again against its own map:
* exhaustive, at the finest cutoff whose quadrature stays affordable (`affordable_radius`:
  the cost grows as the fifth power of the cutoff);
* or pruned (`top_k` > 1): that exhaustive search keeps each particle's `top_k` most probable
  poses, and each of them starts a +-1-step local window at half the coarse steps, scored
  at the current search cutoff (`model.local_search.best_of_starts`); the window holding the
  most evidence wins. With the true map, the 20 most probable poses at 37 A hold one within
  two steps of the truth for 79% of the particles, where the single best holds 51%; re-scored
  at 25 A, 77% end within two steps (68% within one), as the exhaustive search at 30 A does.
Each rank searches its share of the particles; the poses are gathered on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.engine.distributed import World
from cryostoch.engine.prepare import PreparedRun
from cryostoch.engine.refine import Refinement, RefineState
from cryostoch.engine.refine_data import affordable_radius, coarse_steps, top_poses
from cryostoch.model.local_search import best_of_starts

log = logging.getLogger(__name__)

# a local step scores 125 rotations x 25 shifts per image, a start's window 27 x 9: this many
# times more starts than images fit in the same memory
STARTS_PER_IMAGE_BUDGET = 12


@dataclass(frozen=True)
class FoundPoses:
    """One half's global search."""

    rotations: Tensor  # (n_h, 3, 3) float64
    shifts_px: Tensor  # (n_h, 2) float64
    coarse_probability: float  # median best-pose probability of the exhaustive stage
    moved_from_coarse_best: float  # share of particles whose winning start was not the
    # exhaustive stage's most probable pose (0 without pruning)


def search_radii(refinement: Refinement, run: PreparedRun, state: RefineState
                 ) -> tuple[float, float]:
    """(exhaustive cutoff, final cutoff) px of the next global search: without pruning both
    the finest affordable one up to the resolution reached; with it, the final one is the
    local searches' cutoff."""
    coarse = affordable_radius(state.best_radius_px, run)
    if refinement.config.global_top_k <= 1:
        return coarse, coarse
    return coarse, max(coarse, refinement.search_radius(state))


def search_halves(refinement: Refinement, run: PreparedRun, state: RefineState,
                  world: World) -> RefineState:
    """Both halves searched globally, each against its own reference (the halves stay
    independent); the state continues from the found poses with the steps of the search."""
    coarse, fine = search_radii(refinement, run, state)
    rotations, shifts = state.rotations.clone(), state.shifts_px.clone()
    scales = state.particle_scales()
    resolution_a = run.geometry.resolution_a
    for h in (1, 2):
        rows = torch.nonzero(refinement.subset == h).flatten()
        found = half_search(refinement, run, state.half_maps[h - 1], state.reference_mask,
                            rows, scales[rows], coarse, fine, world)
        rotations[rows], shifts[rows] = found.rotations, found.shifts_px
        log.info("global search of half %d: exhaustive at %.1f A (median best-pose "
                 "probability %.2f)%s", h, resolution_a(coarse), found.coarse_probability,
                 "" if fine == coarse else
                 f", its {refinement.config.global_top_k} best poses re-scored at "
                 f"{resolution_a(fine):.1f} A ({100 * found.moved_from_coarse_best:.0f}% "
                 f"moved to another start)")
    angle, shift = coarse_steps(run, coarse)
    if fine > coarse:
        angle, shift = angle / 2, shift / 2
    return dataclasses.replace(
        state, rotations=rotations, shifts_px=shifts, stalls=0, angular_step_rad=angle,
        shift_step_px=shift, global_searches=state.global_searches + 1,
        global_radius_px=fine, spread=None)


def half_search(refinement: Refinement, run: PreparedRun, volume: Tensor,
                mask: Tensor | None, rows: Tensor, scales: Tensor, coarse_radius_px: float,
                fine_radius_px: float, world: World) -> FoundPoses:
    """Particles `rows` (n_h,) with amplitude `scales` (n_h,) searched against `volume`
    (N, N, N) (read inside `mask`, None: the particle's sphere, at the fine stage)."""
    top_k = refinement.config.global_top_k if fine_radius_px > coarse_radius_px else 1
    starts, start_shifts, probability = top_poses(run, volume, rows, coarse_radius_px,
                                                  top_k, world=world)
    if starts.shape[1] == 1:
        return FoundPoses(starts[:, 0], start_shifts[:, 0], probability, 0.0)
    angle, shift = coarse_steps(run, coarse_radius_px)
    block, keep, kx, ky = refinement.reference(volume, mask, fine_radius_px)
    dev = refinement.device
    rotations, shifts = starts[:, 0].clone(), start_shifts[:, 0].clone()
    moved = torch.zeros(len(rows), dtype=torch.float64)
    mine = world.share(torch.arange(len(rows)))
    # each start is scored over 27 rotations: K starts weigh as 27 K rotations of one image
    chunk_size = max(1, min(refinement.config.chunk_size * STARTS_PER_IMAGE_BUDGET
                            // starts.shape[1],
                            refinement.rows_per_chunk(27 * starts.shape[1], len(kx))))
    with torch.no_grad():
        for chunk in mine.split(chunk_size):
            batch = refinement.image_batch(rows[chunk], keep, scales[chunk])
            best_rot, best_shift, evidence = best_of_starts(
                lambda images, r, t: refinement.scores(block, kx, ky, images, r, t),
                batch, starts[chunk].to(dev), start_shifts[chunk].to(dev), angle / 2,
                shift / 2)
            rotations[chunk], shifts[chunk] = best_rot.cpu(), best_shift.cpu()
            moved[chunk] = (evidence.argmax(1) != 0).double().cpu()
    if world.parallel:
        rotations, shifts, moved = (world.gathered_rows(len(rows), x[mine])
                                    for x in (rotations, shifts, moved))
    return FoundPoses(rotations, shifts, probability,
                      float(moved.mean()) if len(rows) else 0.0)


__all__ = ["FoundPoses", "half_search", "search_halves", "search_radii"]
