"""Back-projection of per-direction sums into a 3-D half spectrum, optionally pooled over a
point group before the solve (`reconstruct_map` solves it; see its docstring for the sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.spectrum import SpectrumLayout
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.slicing import (
    hermitian_fold_half_plane,
    insert_slice_weights,
    insert_slices,
    trilinear_stencil,
)

__all__ = ["BackProjection", "backproject_sums", "backprojection_grid_shape",
           "correct_gridding", "gridded_backprojection", "pooling_group"]


def pooling_group(symmetrize) -> Tensor | None:
    """(G, 3, 3) the rotations a symmetriser's point group pools the sums over, None for C1 or
    no symmetriser. `symmetrize`: the run's `Symmetrizer` (a callable with a `group`
    attribute) or None; ValueError for a callable without a group."""
    if symmetrize is None:
        return None
    group = getattr(symmetrize, "group", None)
    if group is None:
        raise ValueError("symmetrize needs a `group` attribute (its point group)")
    return group.matrices if group.order > 1 else None


def _integer_frequencies(k_max: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(kz, ky, kx) float64, each (2K+1, 2K+1, K+1): the integer frequencies of a
    `BackProjection` (kz, ky centred, kx = 0 .. K)."""
    axis = torch.arange(-k_max, k_max + 1, dtype=torch.float64, device=device)
    half = torch.arange(0, k_max + 1, dtype=torch.float64, device=device)
    return torch.meshgrid(axis, axis, half, indexing="ij")


@dataclass
class BackProjection:
    """Back-projected sums on the integer frequencies |k| <= k_max of the rfft3c grid.

    numerator (2K+1, 2K+1, K+1) complex128 and denominator (same shape) float64, with kz and
    ky centred (zero at index K) and kx = 0 .. K; the numerator is already multiplied by
    sqrt(N) and the denominator by N, so V_hat = numerator / denominator where covered.
    """

    numerator: Tensor
    denominator: Tensor
    box_size: int
    k_max: int

    @property
    def radius(self) -> Tensor:
        """|k| (cycles per box) of every coefficient, float64."""
        kz, ky, kx = _integer_frequencies(self.k_max, self.numerator.device)
        return torch.sqrt(kx * kx + ky * ky + kz * kz)


def backproject_sums(
    numerator: Tensor,
    denominator: Tensor,
    model: MarginalLikelihood,
    *,
    oversampling: int | None = None,
    symmetry: Tensor | None = None,
) -> BackProjection:
    """Trilinear back-projection of per-direction sums (D, M) into a 3-D half spectrum.

    The sums live on `model.coefficients` in the psi = 0 frame of `model.direction_matrices`.
    Insertion runs on a grid `oversampling` times finer than the DFT's; the result is read at
    the integer frequencies up to the cutoff + 1 (see `BackProjection`). symmetry: (G, 3, 3)
    point-group rotations whose mates' sums every coefficient pools (`gridded_backprojection`),
    or None.
    """
    n_dir, m = model.n_directions, model.n_points
    if tuple(numerator.shape) != (n_dir, m) or tuple(denominator.shape) != (n_dir, m):
        raise ValueError(
            f"sums must be ({n_dir}, {m}), got {tuple(numerator.shape)} and "
            f"{tuple(denominator.shape)}"
        )
    os_ = int(oversampling or model.config.volume_oversampling)
    if os_ < 1:
        raise ValueError("oversampling must be >= 1")
    n = model.config.box_size
    k_max = min(int(math.floor(model.config.max_radius_px + 1.0)), n // 2 - 1)
    layout = SpectrumLayout(n, k_max, os_)
    shape = backprojection_grid_shape(layout)
    device = numerator.device
    kx = model.coefficients.kx.to(device=device, dtype=torch.float64)
    ky = model.coefficients.ky.to(device=device, dtype=torch.float64)
    rotations = model.direction_matrices.to(device=device, dtype=torch.float64)
    num3 = insert_slices(numerator.to(torch.complex128), rotations, kx, ky, shape, os_)
    den3 = insert_slice_weights(denominator.to(torch.float64), rotations, kx, ky, shape, os_)
    return gridded_backprojection(num3, den3, layout, symmetry)


def backprojection_grid_shape(layout: SpectrumLayout) -> tuple[int, int, int]:
    """Shape (Kz, Ky, Kx) of the oversampled half-spectrum grid slices are inserted into."""
    return (layout.centred_length, layout.centred_length, layout.half_length)


def gridded_backprojection(numerator_grid: Tensor, weight_grid: Tensor,
                           layout: SpectrumLayout,
                           symmetry: Tensor | None = None) -> BackProjection:
    """Inserted sums on the oversampled grid (Kz, Ky, Kx) of `layout` (complex and real, as
    `insert_slices` / `insert_slice_weights` wrote them) -> `BackProjection` at the integer
    frequencies up to layout.k_max: the kx = 0 plane made Hermitian, scaled by sqrt(N) and N.

    symmetry: (G, 3, 3) point-group rotations, or None. With a group, each coefficient gets
    the sums of all its symmetry mates, N(q) = sum_g N(g q) and the same for the weights
    (trilinear reads of the oversampled grid, exact for groups that permute the grid's axes),
    so the solve divides the pooled observations: RELION symmetrises its back-projector's data
    and weights the same way. Solving first and averaging the maps after instead averages each
    coefficient's well-observed mates with unobserved ones when the poses lie in one
    asymmetric unit, as the exhaustive search's do."""
    n, os_, h = layout.box_size, layout.oversampling, layout.half_width
    k_max = int(layout.k_max)
    device = numerator_grid.device
    num3 = hermitian_fold_half_plane(numerator_grid.to(torch.complex128))
    den3 = hermitian_fold_half_plane(weight_grid.to(torch.complex128)).real
    if symmetry is not None and symmetry.shape[0] > 1:
        return _symmetrized(num3, den3, layout, symmetry)
    centred = h + os_ * torch.arange(-k_max, k_max + 1, device=device)
    half = os_ * torch.arange(0, k_max + 1, device=device)
    pick = (centred[:, None, None], centred[None, :, None], half[None, None, :])
    return BackProjection(num3[pick] * math.sqrt(n), den3[pick] * n, n, k_max)


def _symmetrized(num3: Tensor, den3: Tensor, layout: SpectrumLayout,
                 symmetry: Tensor) -> BackProjection:
    """`gridded_backprojection` of folded sums (Kz, Ky, Kx) pooled over the group (G, 3, 3):
    each integer frequency q gathers the trilinear reads at g q, one group element at a time
    (bounded memory)."""
    n, k_max = layout.box_size, int(layout.k_max)
    device = num3.device
    kz, ky, kx = _integer_frequencies(k_max, device)
    points = torch.stack([kx, ky, kz], -1).reshape(-1, 3)  # (P, 3) x, y, z
    flat_num, flat_den = num3.reshape(-1), den3.reshape(-1)
    numerator = torch.zeros(points.shape[0], dtype=torch.complex128, device=device)
    denominator = torch.zeros(points.shape[0], dtype=torch.float64, device=device)
    for g in symmetry.to(device=device, dtype=torch.float64):
        idx, w, flip = trilinear_stencil(points @ g.T, tuple(num3.shape), layout.oversampling)
        values = (flat_num[idx] * w).sum(-1)
        numerator += torch.where(flip, values.conj(), values)
        denominator += (flat_den[idx] * w).sum(-1)
    shape = kz.shape
    return BackProjection(numerator.reshape(shape) * math.sqrt(n),
                          denominator.reshape(shape) * n, n, k_max)


def correct_gridding(volume: Tensor, oversampling: int) -> Tensor:
    """`volume` (N, N, N) divided by the real-space envelope that trilinear gridding on a grid
    `oversampling` times finer than the DFT's imposes: sinc^2(x / (N oversampling)) per axis,
    x = index - N // 2 (the Fourier transform of the triangle kernel).

    A gridded ratio of back-projected sums averages the spectrum over that kernel; where the
    samples are dense that multiplies the map by the envelope (0.41 at the centres of the
    box's faces for oversampling 1, 0.81 for 2), which RELION's back-projector divides out the
    same way. The envelope is floored at its value there, so the correction is exact inside
    the box's inscribed sphere and the solvent in the corners (envelope down to 0.07) is not
    amplified more than at the faces (on a simulated spike at its true poses the unmasked
    half-map FSC 0.143 moved from 19.4 to 12.6 A with the floor, the FSC against the truth
    inside the particle's sphere not at all)."""
    n = volume.shape[-1]
    if tuple(volume.shape) != (n, n, n) or oversampling < 1:
        raise ValueError(f"need an (N, N, N) map and oversampling >= 1, got "
                         f"{tuple(volume.shape)} and {oversampling}")
    x = torch.arange(n, dtype=torch.float64, device=volume.device) - n // 2
    envelope = torch.sinc(x / (n * oversampling)) ** 2
    envelope3 = envelope[:, None, None] * envelope[None, :, None] * envelope[None, None, :]
    face = float(envelope[0])  # x = -N/2: the centre of a face (the other two axes at 0)
    return volume / envelope3.clamp(min=face).to(volume.dtype)
