"""Gold-standard refinement (RELION's auto-refine, cryoSPARC's homogeneous refinement).

Two half sets are kept independent from the start (each with its own copy of the low-passed
start map). Every iteration, for each half:
* E-step: each particle is scored only near its current pose (`model/local_search.py`) at a
  cutoff a few shells past the current gold-standard resolution;
* M-step: the posterior-weighted images are back-projected, the sums pooled over the point
  group's symmetry mates (`gridded_backprojection`), and the half map solved twice: without a
  prior (RELION's unfiltered half map, which the FSC is computed from) and as the Wiener
  estimate whose signal-to-noise per shell is FSC / (1 - FSC) (the next reference).
The FSC of the two unfiltered halves (inside the particle's sphere) sets the next cutoff; the
angular and shift steps are halved down to what that cutoff needs (half a Fourier pixel of arc
at its edge) once the posterior is narrow enough, widened when it fills the window. It stops
when the resolution has not improved for two iterations at steps the posterior no longer asks to
shrink, with one last iteration that reconstructs to Nyquist.

Under torchrun each rank searches a contiguous share of each half's particles; the
back-projection sums, the scalar sums and the particles' new poses are all-reduced, so every
rank solves the same half maps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cryostoch.baselines.reconstruct_map import (
    BackProjection,
    backprojection_grid_shape,
    correct_gridding,
    gridded_backprojection,
    pooling_group,
    shell_power,
    solve_map,
)
from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.refine_data import FullSpectra, RefineConfig
from cryostoch.evaluate.fsc import FscResult, compute_fsc
from cryostoch.evaluate.postprocess import auto_mask
from cryostoch.fourier.spectrum import SpectrumLayout, oversampled_volume_spectrum
from cryostoch.geometry.rotations import geodesic_angle_rad
from cryostoch.model.local_search import (
    ImageBatch,
    LocalScores,
    backproject_local,
    candidate_rotations,
    chunk_rows,
    local_scores,
    on_edge,
    oversampled_candidates,
    posterior_spread,
    rotation_offsets,
    scale_estimate,
    shift_offsets,
)

log = logging.getLogger(__name__)

OVERSAMPLING = 2  # of the map's spectrum for the reads that score poses
# The back-projection grid is the DFT's own: the ratio is read at the integer frequencies, and
# a finer grid would leave most of each sample's trilinear weight between them (7/8 at 2x:
# noisier maps; simulated spike at its true poses, FSC vs the truth 0.50 -> 0.66 at 11 A).
# The wider kernel's real-space envelope is divided out (`correct_gridding`).
BACKPROJECTION_OVERSAMPLING = 1
FSC_THRESHOLD = 0.143  # gold standard (Rosenthal & Henderson 2003)


@dataclass
class RefineState:
    """Everything an iteration changes (what the checkpoint holds)."""

    iteration: int
    rotations: Tensor  # (n, 3, 3) float64 each particle's most probable rotation
    shifts_px: Tensor  # (n, 2) float64 its shift (particle centre at +t)
    half_maps: Tensor  # (2, N, N, N) float64 Wiener-filtered half maps (the references)
    resolution_radius_px: float  # gold-standard FSC 0.143 radius (start: the search cutoff)
    angular_step_rad: float
    shift_step_px: float
    fsc: Tensor | None = None  # (N/2 + 1,) of the last iteration
    best_radius_px: float = 0.0
    stalls: int = 0
    final: bool = False  # the last iteration (reconstruction to Nyquist) is done
    unfiltered: Tensor | None = None  # (2, N, N, N) the halves without the prior (for FSCs)
    global_searches: int = 1  # exhaustive searches done (the first one included)
    global_radius_px: float = 0.0  # cutoff of the last exhaustive search
    reference_mask: Tensor | None = None  # (N, N, N) solvent mask of the references (None:
    # the particle's sphere)
    history: list = field(default_factory=list)
    spread: tuple[float, float] | None = None  # the last posterior's median width per axis
    # (rotation, shift) in steps, which the next steps follow (None: keep the steps as set)
    scales: Tensor | None = None  # (n,) float64 each particle's amplitude scale, mean 1
    # (None: all 1; estimated only with --particle-scale)

    def particle_scales(self) -> Tensor:
        """(n,) float64 a copy of the particles' amplitude scales (all 1 when not estimated)."""
        return (torch.ones(len(self.rotations), dtype=torch.float64) if self.scales is None
                else self.scales.clone())

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_state_dict(state: dict) -> RefineState:
        return RefineState(**state)


@dataclass(frozen=True)
class HalfResult:
    """One half's E- and M-step."""

    volume: Tensor  # (N, N, N) float64 Wiener estimate (the next reference)
    unfiltered: Tensor  # (N, N, N) float64 without the prior (RELION's _unfil half maps)
    rotations: Tensor  # (n_h, 3, 3)
    shifts_px: Tensor  # (n_h, 2)
    mean_nll: float  # -log evidence + data norm over the candidates, per image
    mean_max_probability: float
    mean_rotation_change_deg: float
    median_edge_mass: float  # posterior share on the search window's surface, median over
    # the particles (robust to junk, whose posterior is flat whatever the window)
    rotation_spread: float  # the posterior's rms offset per rotation axis, in steps (median)
    shift_spread: float  # the same for the shift axes
    scales: Tensor  # (n_h,) float64 the particles' amplitude scales (as given without
    # --particle-scale)


def tau2_from_fsc(fsc: Tensor, back: BackProjection, floor: float = 1e-3) -> Tensor:
    """(S,) prior variance per integer shell from the half maps' FSC: SNR = FSC / (1 - FSC)
    times the noise variance of the unregularised estimate, 2 / mean N den (sigma = 1)."""
    shells = back.radius.round().long()
    n_shells = int(shells.max()) + 1
    den = torch.zeros(n_shells, dtype=torch.float64).index_add_(
        0, shells.flatten(), back.denominator.flatten().cpu())
    count = torch.bincount(shells.flatten(), minlength=n_shells).to(torch.float64)
    mean_den = (den / count.clamp(min=1)).clamp(min=1e-30)
    curve = torch.full((n_shells,), floor, dtype=torch.float64)
    length = min(n_shells, fsc.shape[0])
    curve[:length] = fsc[:length].to(torch.float64)
    curve = curve.clamp(floor, 0.999)
    return curve / (1 - curve) * 2.0 / mean_den


def tau2_from_map(volume: Tensor, radius_px: float, n_shells: int) -> Tensor:
    """(S,) the start map's own shell power (RELION's first-iteration prior), flat beyond the
    radius it was low-passed to."""
    power = shell_power(volume)
    last = max(1, min(int(radius_px), power.shape[0] - 1))
    out = torch.full((n_shells,), float(power[last]), dtype=torch.float64)
    length = min(n_shells, last + 1)
    out[:length] = power[:length]
    return out.clamp(min=1e-30)


def normalised_scales(scales: Tensor, low: float = 0.1, high: float = 10.0) -> Tensor:
    """(n,) amplitude scales kept within [low, high] times their median, then divided by
    their mean: the map and the scales trade off (a V = (a / c)(c V)), so the mean is held
    at 1 as RELION holds its groups' scale corrections; the bounds keep junk, whose best
    scale can be near 0, negative or huge, from taking its weight to nothing or past all."""
    typical = scales.median().clamp_min(1e-12)
    kept = scales.clamp(low * typical, high * typical)
    return kept / kept.mean()


def adapted_step(step: float, spread_steps: float, extent: int, finest: float,
                 coarsest: float) -> float:
    """The next step of one search axis from the posterior's rms width on it (in steps):
    doubled when the window (+-extent steps) is less than 2.5 widths, halved when it is more
    than 6, as RELION refines its sampling only once the angular accuracy allows it; within
    [finest, coarsest]."""
    if spread_steps > extent / 2.5:
        step *= 2.0
    elif spread_steps < extent / 6.0:
        step *= 0.5
    return min(max(step, finest), max(coarsest, finest))


def next_steps(state: RefineState, search_radius_px: float, box_size: int, extent: int,
               coarsest: tuple[float, float]) -> tuple[float, float]:
    """(angular step rad, shift step px) of the next local search: the last posterior's width
    decides (`adapted_step`) between half a Fourier pixel of arc (rotation) and of phase
    wavelength (shift) at the search cutoff, and the first exhaustive grid's steps.

    Measured on beta-galactosidase (2,374 particles): halving every iteration regardless
    left the posterior flat over the window (mean best-candidate probability 0.007, 1.7 times
    uniform) and ended at 18.0 A; following the posterior's width kept the steps at 5-9 deg
    and reached 16.8 A."""
    finest_angle = 0.5 / search_radius_px
    finest_shift = max(0.25, box_size / (4 * math.pi * search_radius_px))
    if state.spread is None:
        return (max(finest_angle, state.angular_step_rad),
                max(finest_shift, state.shift_step_px))
    return (adapted_step(state.angular_step_rad, state.spread[0], extent, finest_angle,
                         coarsest[0]),
            adapted_step(state.shift_step_px, state.spread[1], extent, finest_shift,
                         coarsest[1]))


class Refinement:
    """The per-iteration work on prepared data (no file I/O)."""

    def __init__(self, config: RefineConfig, spectra: FullSpectra, subset: Tensor,
                 sphere: Tensor, symmetrize, shift_sigma_px: float,
                 coarsest_steps: tuple[float, float], world: World = ONE_PROCESS) -> None:
        self.config = config
        self.coarsest_steps = coarsest_steps  # (rad, px) the widest local steps
        self.world = world
        self.spectra = spectra
        self.subset = subset  # (n,) 1 or 2
        self.sphere = sphere  # (N, N, N) float64 soft mask of the particle
        self.symmetrize = symmetrize
        self.shift_sigma_px = shift_sigma_px
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.box_size = spectra.points.box_size

    def half_step(self, volume: Tensor, rows: Tensor, rotations: Tensor, shifts_px: Tensor,
                  radius_px: float, steps: tuple[float, float], tau2: Tensor | None,
                  fsc: Tensor | None, mask: Tensor | None, scales: Tensor) -> HalfResult:
        """E- and M-step of one half: particles `rows` (n_h,) at their poses against `volume`
        (N, N, N); the M-step's prior from `fsc` (S,) or, without one, `tau2` (S,); `mask`
        (N, N, N) of the reference (None: the particle's sphere); `scales` (n_h,) float64
        multiply the particles' CTFs."""
        n, dev = self.box_size, self.device
        block, keep, kx, ky = self.reference(volume, mask, radius_px)
        layout = SpectrumLayout(n, min(math.floor(radius_px + 1.0), n // 2 - 1),
                                BACKPROJECTION_OVERSAMPLING)
        shape = backprojection_grid_shape(layout)
        numerator = torch.zeros(shape, dtype=torch.complex128, device=dev)
        weights = torch.zeros(shape, dtype=torch.float64, device=dev)
        extent = self.config.search_extent
        rot_offsets = rotation_offsets(steps[0], extent, device=dev)
        t_offsets = shift_offsets(steps[1], extent, device=dev)
        inner = ~on_edge(extent, 3, device=dev)[:, None] & ~on_edge(extent, 2, device=dev)
        new_rot, new_shift = rotations.clone(), shifts_px.clone()
        new_scales = scales.clone()
        nll_sum = prob_sum = change_sum_deg = 0.0
        edge = torch.empty(len(rows), dtype=torch.float64)
        spread = torch.empty(len(rows), 2, dtype=torch.float64)
        mine = self.world.share(torch.arange(len(rows)))  # this rank's particles of the half
        for chunk in mine.split(self.rows_per_chunk(len(rot_offsets), len(kx))):
            batch = self.image_batch(rows[chunk], keep, scales[chunk])
            start_rot = rotations[chunk].to(dev)
            cand_rot = candidate_rotations(start_rot, rot_offsets)
            cand_shift = shifts_px[chunk].to(dev).unsqueeze(1) + t_offsets
            scores = self.scores(block, kx, ky, batch, cand_rot, cand_shift)
            posterior = scores.posterior()
            evidence = scores.log_evidence() - math.log(posterior[0].numel())
            nll_sum += float((batch.data_norm() - evidence).sum())
            prob_sum += float(posterior.flatten(1).amax(1).sum())
            edge[chunk] = (1 - (posterior * inner).sum((1, 2))).double().cpu()
            spread[chunk] = posterior_spread(posterior, extent).double().cpu()
            if self.config.fine_pass:  # the M-step and the poses from the finer samples
                cand_rot, cand_shift = oversampled_candidates(posterior, cand_rot, cand_shift,
                                                              *steps)
                scores = self.scores(block, kx, ky, batch, cand_rot, cand_shift)
                posterior = scores.posterior()
            if self.config.particle_scale:
                new_scales[chunk] = scale_estimate(scores, posterior,
                                                   scales[chunk].to(dev)).double().cpu()
            best = posterior.flatten(1).argmax(1)
            j, s = best // cand_shift.shape[1], best % cand_shift.shape[1]
            pick = torch.arange(len(chunk), device=dev)
            new_rot[chunk] = cand_rot[pick, j].cpu()
            new_shift[chunk] = cand_shift[pick, s].cpu()
            moved = geodesic_angle_rad(start_rot, cand_rot[pick, j])
            change_sum_deg += math.degrees(float(moved.sum()))
            backproject_local(numerator, weights, scores, posterior, cand_rot, batch, kx, ky,
                              BACKPROJECTION_OVERSAMPLING)
        if self.world.parallel:
            new_rot, new_shift, edge, spread, new_scales = (
                self.world.gathered_rows(len(rows), x[mine])
                for x in (new_rot, new_shift, edge, spread, new_scales))
            self.world.sum_(numerator)
            self.world.sum_(weights)
            nll_sum, prob_sum, change_sum_deg = self.world.sum_(torch.tensor(
                [nll_sum, prob_sum, change_sum_deg], dtype=torch.float64)).tolist()
        # the sums pooled over the point group before the solve (`gridded_backprojection`):
        # the poses of the first, exhaustive search lie in one asymmetric unit
        back = gridded_backprojection(numerator, weights, layout,
                                      pooling_group(self.symmetrize))
        prior = tau2_from_fsc(fsc, back) if fsc is not None else tau2
        solved, unfiltered = (
            correct_gridding(solve_map(back, tau2_per_shell=t, cutoff_px=radius_px),
                             BACKPROJECTION_OVERSAMPLING) for t in (prior, None))
        count = max(1, len(rows))
        return HalfResult(self.symmetrize(solved.cpu()), self.symmetrize(unfiltered.cpu()),
                          new_rot, new_shift, nll_sum / count, prob_sum / count,
                          change_sum_deg / count,
                          float(edge.median()) if len(rows) else 0.0,
                          *(spread.median(0).values.tolist() if len(rows) else (0.0, 0.0)),
                          new_scales)

    def rows_per_chunk(self, rotations_per_image: int, n_points: int) -> int:
        """`chunk_rows` on this run's device and dtype, at most the configured chunk size."""
        return chunk_rows(self.device, self.dtype, rotations_per_image, n_points,
                          self.config.chunk_size)

    def reference(self, volume: Tensor, mask: Tensor | None, radius_px: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the local scores read: the oversampled spectrum block of `volume` (N, N, N)
        times `mask` (None: the particle's sphere) to `radius_px`, the half-plane points
        inside it `keep` (M_all,) bool, and their (M,) kx, ky on the device."""
        points = self.spectra.points
        keep = points.kx**2 + points.ky**2 <= radius_px**2
        kx, ky = points.kx[keep].to(self.device), points.ky[keep].to(self.device)
        masked = (volume * (self.sphere if mask is None else mask)).to(self.device, self.dtype)
        block, _ = oversampled_volume_spectrum(masked, radius_px + 1.0 / OVERSAMPLING,
                                               OVERSAMPLING)
        return block, keep, kx, ky

    def scores(self, block: Tensor, kx: Tensor, ky: Tensor, batch: ImageBatch,
                rotations: Tensor, shifts_px: Tensor) -> LocalScores:
        """Scores of b images over their candidates (b, J, 3, 3) x (b, S, 2), with the
        Gaussian shift prior."""
        log_prior = -0.5 * (shifts_px**2).sum(-1) / self.shift_sigma_px**2
        return local_scores(block, OVERSAMPLING, kx, ky, self.box_size, batch, rotations,
                            shifts_px, log_prior)

    def image_batch(self, rows: Tensor, keep: Tensor, scales: Tensor) -> ImageBatch:
        """The images `rows` (b,) at the points `keep` (M,) on the device, their CTFs times
        their amplitude `scales` (b,)."""
        spectra, dev = self.spectra, self.device
        coefficients = spectra.coefficients[rows][:, keep].to(dev)
        ctf = spectra.ctf_values(rows, keep, dev, self.dtype) * scales.to(
            dev, self.dtype).unsqueeze(-1)
        precision = spectra.precision[spectra.optics_index[rows]][:, keep]
        weighted = (spectra.points.weights[keep].to(precision.dtype) * precision).to(
            dev, self.dtype)
        return ImageBatch(coefficients, ctf, weighted)

    def iterate(self, state: RefineState, tau2_start: Tensor | None) -> RefineState:
        """One gold-standard iteration of both halves; returns the new state."""
        n = self.box_size
        started = time.perf_counter()
        radius = n / 2 - 1 if state.final else self.search_radius(state)
        steps = next_steps(state, radius, n, self.config.search_extent, self.coarsest_steps)
        rotations, shifts = state.rotations.clone(), state.shifts_px.clone()
        scales = state.particle_scales()
        results = []
        for h in (1, 2):
            rows = torch.nonzero(self.subset == h).flatten()
            result = self.half_step(state.half_maps[h - 1], rows, state.rotations[rows],
                                    state.shifts_px[rows], radius, steps, tau2_start,
                                    state.fsc, state.reference_mask, scales[rows])
            rotations[rows], shifts[rows], scales[rows] = (result.rotations, result.shifts_px,
                                                           result.scales)
            results.append(result)
        fsc = self.half_map_fsc(results[0].unfiltered, results[1].unfiltered, radius)
        new_radius = n * self.spectra.pixel_size_a / fsc.resolution_at(FSC_THRESHOLD)
        if self.config.particle_scale:
            scales = normalised_scales(scales)
        record = self._record(state, radius, steps, fsc, results, started, scales)
        return dataclasses.replace(
            state, iteration=state.iteration + 1, rotations=rotations, shifts_px=shifts,
            half_maps=torch.stack([r.volume for r in results]),
            resolution_radius_px=new_radius, angular_step_rad=steps[0],
            shift_step_px=steps[1], fsc=fsc.fsc,
            best_radius_px=max(state.best_radius_px, new_radius),
            stalls=0 if new_radius > state.best_radius_px + 0.5 else state.stalls + 1,
            unfiltered=torch.stack([r.unfiltered for r in results]),
            reference_mask=self._reference_mask(results, fsc),
            history=state.history + [record],
            spread=(record["rotation_spread_steps"], record["shift_spread_steps"]),
            scales=scales if self.config.particle_scale else state.scales)

    def _reference_mask(self, results: list[HalfResult], fsc: FscResult) -> Tensor | None:
        """With reference_mask 'auto': a soft solvent mask of the two halves' average (the
        post-processing rule, `auto_mask`) inside the sphere, for the next references; one
        mask for both halves, as RELION's --solvent_mask."""
        if self.config.reference_mask != "auto":
            return None
        mask = auto_mask(results[0].unfiltered, results[1].unfiltered,
                         self.spectra.pixel_size_a,
                         resolution_a=fsc.resolution_at(FSC_THRESHOLD))
        return mask * self.sphere

    def half_map_fsc(self, half1: Tensor, half2: Tensor, radius_px: float) -> FscResult:
        """FSC of the unfiltered halves (N, N, N) inside the particle's sphere, zero beyond
        the reconstructed band (where both hold only the mask's leakage of their common low
        resolution: no evidence of signal)."""
        n = self.box_size
        fsc = compute_fsc(half1 * self.sphere, half2 * self.sphere,
                          pixel_size_a=self.spectra.pixel_size_a)
        curve = torch.where(fsc.shells > radius_px, 0.0, fsc.fsc)
        return FscResult.from_curve(curve, n, self.spectra.pixel_size_a)

    def _record(self, state: RefineState, radius: float, steps: tuple[float, float],
                fsc: FscResult, results: list[HalfResult], started: float,
                scales: Tensor) -> dict:
        """metrics.csv's row of an iteration (logged)."""
        pixel = self.spectra.pixel_size_a
        record = {
            "iteration": state.iteration + 1, "search_radius_px": radius,
            "search_resolution_a": self.box_size * pixel / radius,
            "angular_step_deg": math.degrees(steps[0]), "shift_step_px": steps[1],
            "resolution_0143_a": fsc.resolution_at(FSC_THRESHOLD),
            "resolution_05_a": fsc.resolution_at(0.5),
            "mean_nll": sum(r.mean_nll for r in results) / 2,
            "mean_max_probability": sum(r.mean_max_probability for r in results) / 2,
            "mean_rotation_change_deg": sum(r.mean_rotation_change_deg for r in results) / 2,
            "window_edge_mass": sum(r.median_edge_mass for r in results) / 2,
            "rotation_spread_steps": sum(r.rotation_spread for r in results) / 2,
            "shift_spread_steps": sum(r.shift_spread for r in results) / 2,
            **{f"scale_p{q}": float(scales.quantile(q / 100)) for q in (10, 50, 90)},
            "seconds": time.perf_counter() - started,
        }
        # with a window of +-1 step every point but the centre is on its surface: the share
        # says something only for wider windows
        edge = (f"; median {100 * record['window_edge_mass']:.0f}% of the posterior on the "
                "window's surface" if self.config.search_extent >= 2 else "")
        edge += (f"; posterior width {record['rotation_spread_steps']:.2f} x "
                 f"{record['shift_spread_steps']:.2f} steps")
        if self.config.particle_scale:
            edge += ("; particle scales {scale_p10:.2f} / {scale_p50:.2f} / {scale_p90:.2f} "
                     "(10th / 50th / 90th percentile)").format(**record)
        log.info("iteration %d: searched to %.1f A (steps %.2f deg, %.2f px); gold-standard "
                 "FSC 0.143 at %.2f A, 0.5 at %.2f A; poses moved %.2f deg%s; %.0f s",
                 record["iteration"], record["search_resolution_a"], record["angular_step_deg"],
                 steps[1], record["resolution_0143_a"], record["resolution_05_a"],
                 record["mean_rotation_change_deg"], edge, record["seconds"])
        return record

    def search_radius(self, state: RefineState) -> float:
        """The local searches' cutoff: `shell_margin` shells past the best resolution so far
        (a dip of the FSC at the particles' common CTF zero can cross 0.143 once, and should
        not shrink the band for good), at most N/2 - 1."""
        best = max(state.resolution_radius_px, state.best_radius_px)
        return min(best + self.config.shell_margin, self.box_size / 2 - 1)

    def converged(self, state: RefineState) -> bool:
        """No gain in resolution for two iterations, at steps the posterior does not ask to
        shrink any more (or that cannot shrink)."""
        if state.stalls < 2:
            return False
        radius = self.search_radius(state)
        steps = next_steps(state, radius, self.box_size, self.config.search_extent,
                           self.coarsest_steps)
        return (steps[0] >= state.angular_step_rad - 1e-12
                and steps[1] >= state.shift_step_px - 1e-12)
