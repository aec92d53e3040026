"""Find the symmetry axes of a map and how well a point group fits it (as `relion_align_symmetry`).

`align_symmetry(V, G)` returns a `SymmetryFit` whose `rotation` `R` turns the centred map into
the group's standard frame (RELION's axis placement, `cryostoch.geometry.symmetry`):
`aligned(x) = V_c(R^T x)` (`rotate_volume(V_c, R)`, docs/conventions.md), `V_c` the map with its
centre of mass moved to the box centre `N // 2` by a Fourier shift. RELION's
`relion_align_symmetry` writes the same rotated map for its Euler angles (`euler_deg()`).

Why the search is over `G \\ SO(3)`: with `W = rotate_volume(V, R)` and `g W = rotate_volume(W, g)`,
`<W, g W> = <V, (R^T g R) V>`, so the score only depends on the conjugate group `R^T G R`, which
`R -> h R` (`h` in `G`) leaves unchanged. Writing `R = Q^T`, that is `Q -> Q h^T`: the right
action that `restrict_orientation_quadrature` divides out, so its grid (transposed) covers the
search space once, |G| times fewer rotations than all of SO(3).

Search (coarse to fine, as `evaluate.align`): the map is Fourier-cropped, low-passed (mean
removed) and masked; the score of `R` is the mean over `g != 1` of the normalised correlation of
the small map with itself rotated by `R^T g R` (at most `MAX_SCORED_ELEMENTS` of the `g`). Global
search over the restricted grid (20 degree step) at box 16, then pattern searches
(`evaluate.align`) of the best four at box 16 (10 -> 2.5 degrees) and of the best at box 32
(2.5 -> 0.6 degrees).
Reported at full size: the weighted (Pearson) correlation, within a soft spherical mask, of the
aligned map with its symmetrised copy (`correlation`; C1 gives 1) and with each rotated copy
`g W` (`element_correlations`, 1 for the identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cryostoch.evaluate.align import (
    _MEMORY_BUDGET_BYTES,
    _Candidate,
    _distinct_best,
    _pattern_search,
    _prepare,
)
from cryostoch.evaluate.transform import (
    centred_coordinates,
    homogeneous_coordinates,
    rotate_volume,
    sampling_grid,
    shift_volume,
    soft_sphere_mask,
)
from cryostoch.fourier import fft3c
from cryostoch.geometry import (
    PointGroup,
    matrix_to_euler,
    orientation_quadrature,
    point_group,
    random_rotations,
    restrict_orientation_quadrature,
    symmetrize_volume,
)

__all__ = ["SymmetryFit", "align_symmetry", "centre_of_mass_px", "masked_correlation"]

GLOBAL_BOX = 16
GLOBAL_CUTOFF = 4.0  # cycles per box
GLOBAL_STEP_DEG = 20.0
CANDIDATES = 4
FINE_BOX = 32
FINE_CUTOFF_FRACTION = 0.35  # of the box
# The score uses at most this many non-identity elements (spread over the group): any dozen of
# them generate it, and it keeps the cost of I (59 rotations per score) near that of D6.
MAX_SCORED_ELEMENTS = 12


@dataclass(frozen=True, eq=False)
class SymmetryFit:
    """`aligned(x) = V_c(R^T x)`, `V_c(x) = V(x - centring_shift_px)`; see the module docstring.

    `rotation` (3, 3) and `centring_shift_px` (3,) `(x, y, z)` are float64 on the CPU;
    `element_correlations` (G,) float64 follows `group.matrices`; `aligned` and `symmetrized`
    are `(N, N, N)` like the input map.
    """

    group: PointGroup
    rotation: Tensor
    centring_shift_px: Tensor
    correlation: float
    element_correlations: Tensor
    aligned: Tensor
    symmetrized: Tensor

    def euler_deg(self) -> Tensor:
        """The rotation as RELION Euler angles `(rot, tilt, psi)` in degrees."""
        return matrix_to_euler(self.rotation)


def centre_of_mass_px(volume: Tensor) -> Tensor:
    """`(3,)` float64 centre of mass `(x, y, z)` of a `(N, N, N)` map relative to the box centre
    `N // 2`, with the solvent level (the mean outside the sphere of radius `0.45 N`) taken as
    zero. Noise is kept with its sign so that it averages out (clipping it at zero would pull
    the centre towards the middle of the box); zero when the density does not add up to a
    positive mass."""
    v = volume.detach().to(torch.float64)
    coords = centred_coordinates(v.shape[-1], dtype=torch.float64, device=v.device)
    outside = coords.norm(dim=-1) > 0.45 * v.shape[-1]
    weights = v - (v[outside].mean() if bool(outside.any()) else 0.0)
    total = weights.sum()
    if float(total) <= 0:
        return torch.zeros(3, dtype=torch.float64)
    return ((weights[..., None] * coords).sum(dim=(0, 1, 2)) / total).cpu()


def masked_correlation(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Weighted Pearson correlation of maps `a` (..., N, N, N) and `b` (..., N, N, N) with
    weights `mask` (N, N, N): `(...)` float64."""
    dims = (-3, -2, -1)
    w = mask.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    total = w.sum()
    a = a - (w * a).sum(dim=dims, keepdim=True) / total
    b = b - (w * b).sum(dim=dims, keepdim=True) / total
    num = (w * a * b).sum(dim=dims)
    den = ((w * a * a).sum(dim=dims) * (w * b * b).sum(dim=dims)).sqrt()
    return num / den.clamp_min(1e-300)


class _SelfScorer:
    """Mean normalised correlation of a small, low-passed, masked copy of the map with itself
    rotated by `R^T g R` for every `g != 1` of the group; duck-types `align._Scorer`."""

    def __init__(self, spectrum: Tensor, box: int, cutoff: float, group: PointGroup):
        """`spectrum`: centred `fft3c` of the full (centred) map."""
        self.box = box
        self.small = _prepare(spectrum, box, cutoff)  # (box, box, box) float32
        self.device = self.small.device
        self.norm = self.small.square().sum().sqrt().clamp_min(1e-30)
        others = group.matrices[1:].to(torch.float64)  # (G-1, 3, 3), CPU
        stride = math.ceil(len(others) / MAX_SCORED_ELEMENTS)
        self.others = others[::stride]
        self.coordinates = homogeneous_coordinates(box, device=self.device)
        self.chunk = max(1, _MEMORY_BUDGET_BYTES // (40 * box**3))

    def score(self, rotations: Tensor) -> tuple[Tensor, Tensor]:
        """`(B, 3, 3)` rotations -> `(B,)` scores and `(B, 3)` zero shifts, float64 CPU."""
        b, m = rotations.shape[0], self.others.shape[0]
        r = rotations.to(torch.float64)
        conj = r.transpose(-1, -2)[:, None] @ self.others[None] @ r[:, None]  # (B, G-1, 3, 3)
        out = []
        n = self.box
        for chunk in conj.reshape(-1, 3, 3).split(self.chunk):
            mats = chunk.to(device=self.device, dtype=torch.float32)
            grid = sampling_grid(mats, n, coordinates=self.coordinates)
            source = self.small[None, None].expand(len(mats), 1, n, n, n)
            rot = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)[:, 0]
            dot = (rot * self.small).sum(dim=(-3, -2, -1))
            norm = rot.square().sum(dim=(-3, -2, -1)).sqrt().clamp_min(1e-30)
            out.append((dot / (norm * self.norm)).double().cpu())
        scores = torch.cat(out).reshape(b, m).mean(dim=1)
        return scores, torch.zeros(b, 3, dtype=torch.float64)


def _search(spectrum: Tensor, group: PointGroup, generator: torch.Generator | None) -> Tensor:
    """`(3, 3)` float64 rotation maximising the self-correlation score (module docstring)."""
    n = spectrum.shape[-1]
    box = min(n, GLOBAL_BOX)
    coarse = _SelfScorer(spectrum, box, min(GLOBAL_CUTOFF, 0.4 * box), group)
    step = math.radians(GLOBAL_STEP_DEG)
    grid = restrict_orientation_quadrature(orientation_quadrature(1 / math.tan(step)), group)
    rotations = grid.matrices().transpose(-1, -2)  # R = Q^T
    if generator is not None:  # R U: still one rotation per coset h R
        rotations = rotations @ random_rotations(1, generator, dtype=torch.float64,
                                                 device="cpu")[0]
    scores, _ = coarse.score(rotations)
    zero = torch.zeros(3, dtype=torch.float64)
    candidates = [_Candidate(rotations[i], 0, float(scores[i]), zero)
                  for i in _distinct_best(rotations, scores, CANDIDATES, 1.5 * step)]
    candidates = _pattern_search([coarse, coarse], candidates, GLOBAL_STEP_DEG / 2,
                                 GLOBAL_STEP_DEG / 8)
    candidates.sort(key=lambda c: -c.score)
    fine_box = min(n, FINE_BOX)
    fine = _SelfScorer(spectrum, fine_box, FINE_CUTOFF_FRACTION * fine_box, group)
    best = _pattern_search([fine, fine], candidates[:1], 2.5, 0.6)
    return best[0].rotation


def align_symmetry(
    volume: Tensor,
    group: PointGroup | str,
    *,
    generator: torch.Generator | None = None,
    centre: bool = True,
    mask_radius_px: float | None = None,
    oversampling: int | None = None,
) -> SymmetryFit:
    """Rotate `volume` (N, N, N) into the standard frame of `group` (a `PointGroup` or a RELION
    name) and measure how well the group fits; see the module docstring.

    `generator`: turns the global grid by a random rotation (default: fixed grid,
    deterministic). `centre`: move the centre of mass to the box centre first (RELION's default;
    `False` is its `--keep_centre`). `mask_radius_px`: radius of the soft spherical mask of the
    correlations (default `0.4 N`, edge `0.1 N`). `oversampling` of the final resampling
    (default 2 up to box 160, else 1).
    """
    n = volume.shape[-1]
    if volume.dim() != 3 or tuple(volume.shape) != (n, n, n):
        raise ValueError(f"volume must have shape (N, N, N), got {tuple(volume.shape)}")
    if n < 8:
        raise ValueError(f"box {n} is too small to align")
    if isinstance(group, str):
        group = point_group(group)
    radius = 0.4 * n if mask_radius_px is None else float(mask_radius_px)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"mask radius must be positive, got {mask_radius_px!r}")
    if oversampling is None:
        oversampling = 2 if n <= 160 else 1
    shift = -centre_of_mass_px(volume) if centre else torch.zeros(3, dtype=torch.float64)
    centred = shift_volume(volume.detach(), shift) if centre else volume.detach()
    if group.order == 1:
        rotation = torch.eye(3, dtype=torch.float64)
    else:
        rotation = _search(fft3c(centred.to(torch.float32)), group, generator)
    aligned = rotate_volume(centred, rotation, oversampling=oversampling)
    symmetrized = symmetrize_volume(aligned, group, oversampling=oversampling)
    mask = soft_sphere_mask(n, radius, edge_px=0.1 * n, dtype=torch.float64,
                            device=volume.device)
    per_element = torch.cat([
        masked_correlation(rotate_volume(aligned[None], chunk, oversampling=oversampling),
                           aligned, mask).cpu()
        for chunk in group.matrices.to(aligned.device).split(8)
    ])
    correlation = float(masked_correlation(symmetrized, aligned, mask))
    return SymmetryFit(group, rotation, shift, correlation, per_element, aligned, symmetrized)
