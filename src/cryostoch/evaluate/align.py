"""Superimpose one map on another: rotation, shift and hand (ab initio maps have arbitrary
orientation, position and handedness).

`align_maps(reference, moving, ...)` returns an `Alignment` such that
`apply_alignment(moving, alignment)`, i.e. `rotate_volume(M', R, s)` with `M'` the moving map,
mirrored first (`mirror_volume`, z reversed) when `alignment.mirrored`, best matches the reference:
`aligned(x) = M'(R^T (x - s))` (see `cryostoch.evaluate.transform`). `allow_mirror=False` keeps
the hand as given. `cryostoch.evaluate.superimpose` wraps it for maps on different grids and
symmetric references.

Search (coarse to fine, everything batched and on the maps' device):

1. Both maps are Fourier-cropped to a small box, low-passed (soft edge, mean removed) and given a
   soft spherical mask. Global search at box 20 and 5 cycles per box over a near-uniform SO(3)
   grid (Lebedev directions x in-plane angles, 20 degree spacing, 3960 rotations), for both hands.
   For each rotation the translation comes from the FFT cross-correlation (peak within a quarter
   of the box, refined to sub-pixel by a parabola per axis); the score is the normalised
   cross-correlation at the peak.
2. The best few distinct rotations of each hand are refined by a pattern search over 27 rotation
   perturbations `exp([d]_x) R` with `d` on a cube of step `s` (halving `s` when the centre wins),
   first at the global scale (10 -> 2.5 degrees), then for the best three at box 32
   (3 -> 1 degree), then for the best at box 64 (1 -> 0.5 degree), each at a finer low-pass
   (never beyond `resolution_a`). The shift of the final stage is scaled to the full box.
3. `correlation` is the real-space correlation coefficient of the reference and the aligned map,
   both low-passed to `resolution_a`, over the whole box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cryostoch.evaluate.transform import (
    homogeneous_coordinates,
    mirror_volume,
    rotate_volume,
    sampling_grid,
    soft_sphere_mask,
)
from cryostoch.fourier import fft3c, ifft3c
from cryostoch.fourier.grids import fft3_grid
from cryostoch.geometry import (
    DIRECTION_DENSITY_FACTOR,
    direction_to_euler,
    euler_to_matrix,
    geodesic_angle_rad,
    matrix_to_euler,
    random_rotations,
    rotvec_to_matrix,
)

__all__ = [
    "Alignment",
    "align_maps",
    "apply_alignment",
    "so3_grid",
]

GLOBAL_BOX = 20
GLOBAL_CUTOFF = 5.0  # cycles per box
GLOBAL_STEP_DEG = 20.0
CANDIDATES_PER_HAND = 4
MEDIUM_BOX = 32
FINE_BOX = 64
MAX_SHIFT_FRACTION = 0.25
_MEMORY_BUDGET_BYTES = 96 * 2**20


@dataclass(frozen=True)
class Alignment:
    """`aligned(x) = M'(R^T (x - s))`: `M'` is the moving map, mirrored (z reversed about the
    box centre) first if `mirrored`; `rotation` `R` (3, 3) and `shift_px` `s` (x, y, z) in
    pixels of the full box, both float64 on the CPU; `correlation` of the aligned map with the
    reference (see `align_maps`)."""

    rotation: Tensor
    shift_px: Tensor
    mirrored: bool
    correlation: float

    def euler_deg(self) -> Tensor:
        """The rotation as RELION Euler angles `(rot, tilt, psi)` in degrees."""
        return matrix_to_euler(self.rotation)

    def apply(self, moving: Tensor, *, oversampling: int | None = None) -> Tensor:
        return apply_alignment(moving, self, oversampling=oversampling)

    def describe(self, pixel_size_a: float) -> list[str]:
        """Indented lines: the rotation (RELION Euler angles), shift (pixels and A), hand and
        correlation."""
        rot, tilt, psi = self.euler_deg().tolist()
        sx, sy, sz = self.shift_px.tolist()
        p = pixel_size_a
        return [
            f"  rotation (RELION rot, tilt, psi): {rot:.2f} {tilt:.2f} {psi:.2f} deg",
            f"  shift (x, y, z): {sx:.2f} {sy:.2f} {sz:.2f} px "
            f"({sx * p:.2f} {sy * p:.2f} {sz * p:.2f} A)",
            f"  hand flipped: {'yes' if self.mirrored else 'no'}",
            f"  correlation: {self.correlation:.4f}",
        ]


def apply_alignment(
    moving: Tensor, alignment: Alignment, *, oversampling: int | None = None
) -> Tensor:
    """The moving map superimposed on the reference: `rotate_volume(M', R, s)`.

    `oversampling` (default 2 for boxes up to 160, else 1) upsamples the map by Fourier padding
    before the trilinear resampling, which keeps the high frequencies nearly intact.
    """
    n = moving.shape[-1]
    if oversampling is None:
        oversampling = 2 if n <= 160 else 1
    source = mirror_volume(moving) if alignment.mirrored else moving
    return rotate_volume(source, alignment.rotation, alignment.shift_px,
                         oversampling=oversampling)


# ---------------------------------------------------------------------------------------------
# Scoring rotations at one scale
# ---------------------------------------------------------------------------------------------

def _soft_low_pass(n: int, cutoff: float, *, device, width: float = 2.0) -> Tensor:
    """Centred (n, n, n) filter: 1 below `cutoff - width/2`, raised cosine to 0 at
    `cutoff + width/2` (cycles per box), and 0 at k = 0 (removes the mean)."""
    kz, ky, kx = fft3_grid(n, device=device)
    r = torch.sqrt(kx * kx + ky * ky + kz * kz)
    t = ((r - (cutoff - width / 2)) / width).clamp(0.0, 1.0)
    filt = 0.5 * (1.0 + torch.cos(math.pi * t))
    filt[n // 2, n // 2, n // 2] = 0.0
    return filt


def _crop_spectrum(spectrum: Tensor, box: int) -> Tensor:
    """Centred `fft3c` spectrum of an N box -> that of the `box` box (Fourier crop), with the
    scaling of `resample_volume` (real-space values preserved)."""
    n = spectrum.shape[-1]
    if box == n:
        return spectrum
    start = n // 2 - box // 2
    w = slice(start, start + box)
    return spectrum[w, w, w] * (box / n) ** 1.5


def _prepare(spectrum: Tensor, box: int, cutoff: float) -> Tensor:
    """Full centred spectrum -> float32 map in a `box` box, low-passed at `cutoff` cycles per
    box (soft edge, mean removed) and masked by a soft sphere."""
    small = _crop_spectrum(spectrum, box)
    filt = _soft_low_pass(box, cutoff, device=small.device).to(small.real.dtype)
    small = ifft3c(small * filt).real.to(torch.float32)
    mask = soft_sphere_mask(box, 0.4 * box, edge_px=0.1 * box, device=small.device)
    return small * mask


class _Scorer:
    """Normalised cross-correlation of the reference with rotated copies of the moving map,
    maximised over translations, at one box size and low-pass."""

    def __init__(self, reference: Tensor, moving: Tensor, box: int, cutoff: float):
        """`reference`, `moving`: centred spectra (`fft3c`) of the full maps."""
        self.box = box
        self.device = reference.device
        ref = _prepare(reference, box, cutoff)
        ref = ref - ref.mean()
        self.ref_norm = ref.square().sum().sqrt().clamp_min(1e-30)
        self.ref_hat = torch.fft.rfftn(ref, dim=(-3, -2, -1))
        self.moving = _prepare(moving, box, cutoff)[None, None]
        self.coordinates = homogeneous_coordinates(box, device=self.device)
        k = torch.fft.fftfreq(box, d=1.0 / box, device=self.device)  # wrapped shift per index
        tz, ty, tx = torch.meshgrid(k, k, k, indexing="ij")
        limit = MAX_SHIFT_FRACTION * box
        allowed = (tx * tx + ty * ty + tz * tz <= limit * limit).flatten()
        self.allowed = torch.nonzero(allowed).flatten()
        self.chunk = max(1, _MEMORY_BUDGET_BYTES // (40 * box**3))

    def score(self, matrices: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, 3, 3)` rotations -> `(B,)` scores and `(B, 3)` shifts `(x, y, z)` in pixels of
        this box, float64 on the CPU."""
        scores, shifts = [], []
        n = self.box
        for chunk in matrices.split(self.chunk):
            b = chunk.shape[0]
            mats = chunk.to(device=self.device, dtype=torch.float32)
            grid = sampling_grid(mats, n, coordinates=self.coordinates)
            rot = F.grid_sample(self.moving.expand(b, 1, n, n, n), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=True)[:, 0]
            rot = rot - rot.mean(dim=(-3, -2, -1), keepdim=True)
            # (torch's float32 norm is inaccurate, ~1e-4; a plain sum of squares is not)
            norm = rot.square().sum(dim=(-3, -2, -1)).sqrt().clamp_min(1e-30)
            spec = self.ref_hat * torch.fft.rfftn(rot, dim=(-3, -2, -1)).conj()
            cc = torch.fft.irfftn(spec, s=(n, n, n), dim=(-3, -2, -1))
            cc = cc / (norm * self.ref_norm)[:, None, None, None]
            peak, j = cc.flatten(1).index_select(1, self.allowed).max(dim=1)
            index = self.allowed[j]
            iz, iy, ix = index // (n * n), (index // n) % n, index % n
            batch = torch.arange(b, device=self.device)
            gain = torch.zeros_like(peak)
            offsets = []
            for axis in range(3):  # z, y, x
                idx_m = [iz, iy, ix]
                idx_p = [iz, iy, ix]
                idx_m[axis] = (idx_m[axis] - 1) % n
                idx_p[axis] = (idx_p[axis] + 1) % n
                y_m = cc[batch, idx_m[0], idx_m[1], idx_m[2]]
                y_p = cc[batch, idx_p[0], idx_p[1], idx_p[2]]
                curv = y_m - 2 * peak + y_p
                safe = torch.where(curv < 0, curv, -torch.ones_like(curv))
                off = torch.where(curv < 0, 0.5 * (y_m - y_p) / safe, 0.0).clamp(-0.5, 0.5)
                gain = gain + 0.25 * (y_p - y_m) * off
                offsets.append(off)
            wrap = torch.stack([iz, iy, ix], -1).to(torch.float32)
            wrap = torch.where(wrap > n // 2, wrap - n, wrap) + torch.stack(offsets, -1)
            scores.append((peak + gain).double().cpu())
            shifts.append(wrap.flip(-1).double().cpu())  # (z, y, x) -> (x, y, z)
        return torch.cat(scores), torch.cat(shifts)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

def _fibonacci_directions(count: int) -> Tensor:
    i = torch.arange(count, dtype=torch.float64)
    z = 1.0 - (2.0 * i + 1.0) / count
    r = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    phi = i * (math.pi * (3.0 - math.sqrt(5.0)))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1)


def so3_grid(step_rad: float) -> Tensor:
    """Near-uniform rotations `(M, 3, 3)` (float64, CPU) of spacing about `step_rad`:
    `Rz(psi) @ A_d` for a golden-spiral set of `(3.6 / step)^2` projection directions `d` (as
    `orientation_quadrature`) and `ceil(2 pi / step)` in-plane angles psi."""
    directions = _fibonacci_directions(math.ceil((DIRECTION_DENSITY_FACTOR / step_rad) ** 2))
    n_psi = math.ceil(2 * math.pi / step_rad)
    euler = direction_to_euler(directions)  # (D, 3), psi = 0
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    euler = euler[:, None, :].repeat(1, n_psi, 1)
    euler[:, :, 2] = psi
    return euler_to_matrix(euler.reshape(-1, 3))


def _distinct_best(matrices: Tensor, scores: Tensor, count: int, min_angle: float) -> list[int]:
    chosen: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if chosen and bool((geodesic_angle_rad(matrices[i], matrices[chosen]) < min_angle).any()):
            continue
        chosen.append(i)
        if len(chosen) == count:
            break
    return chosen


_CUBE = torch.stack(
    torch.meshgrid(*([torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)] * 3), indexing="ij"),
    dim=-1,
).reshape(27, 3)
_CENTRE = 13


@dataclass
class _Candidate:
    rotation: Tensor  # (3, 3) float64 CPU
    hand: int  # 0: as given, 1: mirrored
    score: float
    shift: Tensor  # (3,) pixels of the box that scored it


def _pattern_search(
    scorers: list[_Scorer | None],
    candidates: list[_Candidate],
    step_deg: float,
    min_step_deg: float,
    max_iterations: int = 12,
) -> list[_Candidate]:
    """Refine every candidate by the cube pattern search (batched over candidates)."""
    rotations = torch.stack([c.rotation for c in candidates])
    hands = [c.hand for c in candidates]
    steps = [math.radians(step_deg)] * len(candidates)
    scores = [-math.inf] * len(candidates)
    shifts = [c.shift for c in candidates]
    min_step = math.radians(min_step_deg) * (1 - 1e-9)
    for _ in range(max_iterations):
        active = [i for i, s in enumerate(steps) if s >= min_step]
        if not active:
            break
        step = torch.tensor([steps[i] for i in active], dtype=torch.float64)
        perturb = rotvec_to_matrix(step[:, None, None] * _CUBE[None])  # (A, 27, 3, 3)
        trial = perturb @ rotations[active][:, None]
        trial_scores = torch.empty(len(active), 27, dtype=torch.float64)
        trial_shifts = torch.empty(len(active), 27, 3, dtype=torch.float64)
        for hand in (0, 1):
            rows = [j for j, i in enumerate(active) if hands[i] == hand]
            if not rows:
                continue
            scorer = scorers[hand]
            assert scorer is not None
            s, t = scorer.score(trial[rows].reshape(-1, 3, 3))
            trial_scores[rows] = s.reshape(len(rows), 27)
            trial_shifts[rows] = t.reshape(len(rows), 27, 3)
        best = trial_scores.argmax(dim=1).tolist()
        for j, i in enumerate(active):
            b = best[j]
            scores[i] = float(trial_scores[j, b])
            shifts[i] = trial_shifts[j, b]
            if b == _CENTRE:
                steps[i] /= 2
            else:
                rotations[i] = trial[j, b]
    return [
        _Candidate(rotations[i].clone(), hands[i], scores[i], shifts[i])
        for i in range(len(candidates))
    ]


def _check_maps(reference: Tensor, moving: Tensor) -> int:
    n = reference.shape[-1]
    if reference.dim() != 3 or tuple(reference.shape) != (n, n, n):
        raise ValueError(f"maps must be cubic (N, N, N), got {tuple(reference.shape)}")
    if tuple(moving.shape) != tuple(reference.shape):
        raise ValueError(
            f"maps differ in shape: {tuple(reference.shape)} and {tuple(moving.shape)}"
        )
    if n < 8:
        raise ValueError(f"box {n} is too small to align")
    return n


def align_maps(
    reference: Tensor,
    moving: Tensor,
    *,
    pixel_size_a: float,
    resolution_a: float | None = None,
    generator: torch.Generator | None = None,
    allow_mirror: bool = True,
) -> Alignment:
    """Rotation, shift and hand that best superimpose `moving` on `reference` (see the module
    docstring for the search).

    `resolution_a`: finest detail used (default: 4 pixels, i.e. half of Nyquist); the search
    starts far coarser. `generator`: if given, the global rotation grid is turned by a random
    rotation drawn from it (otherwise the grid is fixed and the result deterministic).
    `allow_mirror`: search the mirror image too (default); False keeps the hand as given.
    Both maps must be `(N, N, N)` on the same device; the work runs there.
    """
    n = _check_maps(reference, moving)
    if not (math.isfinite(pixel_size_a) and pixel_size_a > 0):
        raise ValueError(f"pixel size must be positive, got {pixel_size_a!r}")
    if resolution_a is None:
        cutoff = n / 4
    else:
        if not (math.isfinite(resolution_a) and resolution_a > 0):
            raise ValueError(f"resolution must be positive, got {resolution_a!r}")
        cutoff = n * pixel_size_a / resolution_a
    cutoff = min(max(cutoff, 2.0), n / 2)
    reference = reference.detach().to(torch.float32)
    moving = moving.to(device=reference.device, dtype=torch.float32).detach()
    ref_spectrum = fft3c(reference)
    searched = (0, 1) if allow_mirror else (0,)  # 0: the hand as given, 1: mirrored
    hands = [fft3c(moving), fft3c(mirror_volume(moving)) if allow_mirror else None]

    def scorers(box: int, k: float, which: tuple[int, ...] = searched) -> list[_Scorer | None]:
        box = min(n, box)
        return [
            _Scorer(ref_spectrum, h, box, min(k, cutoff)) if i in which and h is not None
            else None
            for i, h in enumerate(hands)
        ]

    # 1. global search
    coarse = scorers(GLOBAL_BOX, GLOBAL_CUTOFF)
    step = math.radians(GLOBAL_STEP_DEG)
    grid = so3_grid(step)
    if generator is not None:
        grid = grid @ random_rotations(1, generator, dtype=torch.float64, device="cpu")[0]
    candidates: list[_Candidate] = []
    for hand in searched:
        s, t = coarse[hand].score(grid)
        for i in _distinct_best(grid, s, CANDIDATES_PER_HAND, 1.5 * step):
            candidates.append(_Candidate(grid[i], hand, float(s[i]), t[i]))

    # 2. local refinement, coarse to fine
    candidates = _pattern_search(coarse, candidates, GLOBAL_STEP_DEG / 2, GLOBAL_STEP_DEG / 8)
    candidates.sort(key=lambda c: -c.score)
    keep = candidates[:2]
    other = next((c for c in candidates if c.hand != keep[0].hand), None)
    if other is not None and all(c.hand == keep[0].hand for c in keep):
        keep.append(other)
    else:
        keep = candidates[:3]
    medium = scorers(MEDIUM_BOX, 0.375 * min(n, MEDIUM_BOX))
    keep = _pattern_search(medium, keep, 3.0, 1.0)
    best = max(keep, key=lambda c: c.score)
    fine = scorers(FINE_BOX, 0.4 * min(n, FINE_BOX), (best.hand,))
    best = _pattern_search(fine, [best], 1.0, 0.5)[0]
    shift = best.shift * (n / min(n, FINE_BOX))
    rotation = best.rotation

    # 3. correlation at full size
    mirrored = best.hand == 1
    result = Alignment(rotation, shift, mirrored, 0.0)
    aligned = apply_alignment(moving, result, oversampling=1)
    filt = _soft_low_pass(n, cutoff, device=reference.device).to(torch.float32)
    a = ifft3c(ref_spectrum * filt).real.double()
    b = ifft3c(fft3c(aligned) * filt).real.double()
    corr = float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt().clamp_min(1e-30))
    return Alignment(rotation, shift, mirrored, corr)
