"""Central-slice extraction from a half spectrum (Fourier slice theorem) and its exact adjoint.

A half spectrum is a complex array `[kz, ky, kx]` whose centred axes (kz, ky) have zero
frequency at index `length // 2` and whose half axis kx starts at zero; grid spacing is
`1 / oversampling` cycles per box. This covers both `rfft3c` output (oversampling 1, length N)
and the oversampled blocks of `cryostoch.fourier.spectrum` (length 2h+1). Points with kx < 0 are
read from their Hermitian twin: V(-k) = conj(V(k)).

For a rotation A (RELION convention), the projection image's spectrum at 2-D frequency
(kx, ky) is V_hat(A^T (kx, ky, 0)) = V_hat(kx * A[0, :] + ky * A[1, :]).
"""

from __future__ import annotations

import torch
from torch import Tensor


def slice_points_3d(rotations: Tensor, kx: Tensor, ky: Tensor) -> Tensor:
    """3-D frequencies (..., M, 3) (x, y, z order) of the 2-D points under rotations (..., 3, 3)."""
    row0 = rotations[..., 0, :].unsqueeze(-2)  # (..., 1, 3)
    row1 = rotations[..., 1, :].unsqueeze(-2)
    return kx.unsqueeze(-1) * row0 + ky.unsqueeze(-1) * row1


def trilinear_stencil(
    points: Tensor, shape: tuple[int, int, int], oversampling: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices (..., 8), weights (..., 8) and a conjugation flag (...) for trilinear reads.

    `points` (..., 3) are frequencies (x, y, z) in cycles per box. Corners outside the array get
    weight 0 (and a clamped, valid index) so that callers never read out of bounds.
    """
    n_z, n_y, n_x = shape
    flip = points[..., 0] < 0
    p = torch.where(flip.unsqueeze(-1), -points, points) * oversampling
    # per axis: the two neighbours' clamped indices (..., 2) and weights (zero outside);
    # the 8 corners are their outer products (z slowest, x fastest), built by broadcasting
    # rather than corner by corner (a third of the work)
    axes = []
    for coordinate, length in ((p[..., 2] + n_z // 2, n_z), (p[..., 1] + n_y // 2, n_y),
                               (p[..., 0], n_x)):
        low = coordinate.floor()
        frac = coordinate - low
        corner = torch.stack([low, low + 1], -1)
        weight = torch.stack([1 - frac, frac], -1) * ((corner >= 0) & (corner < length))
        axes.append((corner.clamp(0, length - 1).long(), weight))
    (iz, wz), (iy, wy), (ix, wx) = axes
    flat = ((iz[..., :, None, None] * n_y + iy[..., None, :, None]) * n_x
            + ix[..., None, None, :])
    weights = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    batch = points.shape[:-1]
    return flat.reshape(*batch, 8), weights.reshape(*batch, 8), flip


def extract_slices(
    half_spectrum: Tensor, rotations: Tensor, kx: Tensor, ky: Tensor, oversampling: int = 1
) -> Tensor:
    """Values (..., M) of central slices at 2-D frequencies (kx, ky) for rotations (..., 3, 3).

    Trilinear interpolation; differentiable (autograd's backward is `insert_slices`).
    """
    points = slice_points_3d(rotations.to(kx.dtype), kx, ky)
    idx, w, flip = trilinear_stencil(points, tuple(half_spectrum.shape), oversampling)
    flat = half_spectrum.reshape(-1)
    values = (flat[idx.reshape(-1)].reshape(idx.shape) * w.to(flat.real.dtype)).sum(-1)
    return torch.where(flip, values.conj(), values)


def extract_slices_sampled(
    half_spectrum: Tensor, rotations: Tensor, kx: Tensor, ky: Tensor, oversampling: int = 1
) -> Tensor:
    """The same values as `extract_slices`, read by torch's `grid_sample` (trilinear, zero
    outside the block): several times faster for many slices of different rotations.

    half_spectrum: (Kz, Ky, Kx) complex with centred kz, ky; rotations (..., 3, 3);
    kx, ky: (M,). Returns (..., M) complex.
    """
    import torch.nn.functional as functional

    n_z, n_y, n_x = half_spectrum.shape
    points = slice_points_3d(rotations.to(kx.dtype), kx, ky)
    flip = points[..., 0] < 0
    p = torch.where(flip.unsqueeze(-1), -points, points) * oversampling
    # grid_sample's normalised coordinates (align_corners): -1 and 1 are the end samples
    grid = torch.stack([p[..., 0] * (2.0 / (n_x - 1)) - 1,
                        (p[..., 1] + n_y // 2) * (2.0 / (n_y - 1)) - 1,
                        (p[..., 2] + n_z // 2) * (2.0 / (n_z - 1)) - 1], -1)
    channels = torch.view_as_real(half_spectrum).permute(3, 0, 1, 2).unsqueeze(0)
    sampled = functional.grid_sample(channels, grid.reshape(1, 1, 1, -1, 3).to(channels.dtype),
                                     mode="bilinear", padding_mode="zeros", align_corners=True)
    values = torch.complex(sampled[0, 0, 0, 0], sampled[0, 1, 0, 0]).reshape(flip.shape)
    return torch.where(flip, values.conj(), values)


def insert_slices(
    slices: Tensor,
    rotations: Tensor,
    kx: Tensor,
    ky: Tensor,
    shape: tuple[int, int, int],
    oversampling: int = 1,
) -> Tensor:
    """Exact adjoint of `extract_slices` (as a real-linear map): back-projection in Fourier space.

    Satisfies Re<extract(V), u> = Re<V, insert(u)> for every complex V and u, where
    <a, b> = sum(conj(a) * b).
    """
    points = slice_points_3d(rotations.to(kx.dtype), kx, ky)
    idx, w, flip = trilinear_stencil(points, shape, oversampling)
    u = torch.where(flip, slices.conj(), slices)
    contributions = u.unsqueeze(-1) * w.to(slices.real.dtype)
    out = torch.zeros(shape[0] * shape[1] * shape[2], dtype=slices.dtype, device=slices.device)
    out.index_add_(0, idx.reshape(-1), contributions.reshape(-1))
    return out.reshape(shape)


def insert_slice_weights(
    weights: Tensor,
    rotations: Tensor,
    kx: Tensor,
    ky: Tensor,
    shape: tuple[int, int, int],
    oversampling: int = 1,
) -> Tensor:
    """Back-project real per-point weights (e.g. CTF^2 counts) with the same trilinear kernel."""
    points = slice_points_3d(rotations.to(kx.dtype), kx, ky)
    idx, w, _ = trilinear_stencil(points, shape, oversampling)
    out = torch.zeros(shape[0] * shape[1] * shape[2], dtype=weights.dtype, device=weights.device)
    out.index_add_(0, idx.reshape(-1), (weights.unsqueeze(-1) * w.to(weights.dtype)).reshape(-1))
    return out.reshape(shape)


def insert_slices_and_weights(
    numerator: Tensor,
    weight_grid: Tensor,
    slices: Tensor,
    weights: Tensor,
    rotations: Tensor,
    kx: Tensor,
    ky: Tensor,
    oversampling: int = 1,
) -> None:
    """In place: numerator += `insert_slices(slices)` and weight_grid +=
    `insert_slice_weights(weights)`, with the trilinear stencil computed once for both (the
    M-step's back-projection, where the stencil is most of the cost).

    numerator: (Kz, Ky, Kx) complex; weight_grid: (Kz, Ky, Kx) real; slices: (..., M) complex;
    weights: (..., M) real; rotations: (..., 3, 3); kx, ky: (M,).
    """
    points = slice_points_3d(rotations.to(kx.dtype), kx, ky)
    idx, w, flip = trilinear_stencil(points, tuple(numerator.shape), oversampling)
    u = torch.where(flip, slices.conj(), slices).to(numerator.dtype)
    w = w.to(weight_grid.dtype)
    flat_idx = idx.reshape(-1)
    # 1-D index_add_ on the complex grid: several times faster than on its (K, 2) real view
    numerator.view(-1).index_add_(0, flat_idx, (u.unsqueeze(-1) * w).reshape(-1))
    weight_grid.view(-1).index_add_(0, flat_idx,
                                    (weights.to(w.dtype).unsqueeze(-1) * w).reshape(-1))


def hermitian_fold_half_plane(half_spectrum: Tensor) -> Tensor:
    """Make the kx = 0 plane of a back-projected half spectrum Hermitian.

    Back-projection writes each kx = 0 coefficient and its twin separately; a real volume needs
    V(0, -ky, -kz) = conj(V(0, ky, kz)), so both get the sum of one and the twin's conjugate.
    Assumes centred axes of odd length (oversampled blocks) or even length with the unmatched
    most-negative row left alone.
    """
    out = half_spectrum.clone()
    plane = half_spectrum[:, :, 0]
    n_z, n_y = plane.shape
    sz, sy = (1 if n_z % 2 == 0 else 0), (1 if n_y % 2 == 0 else 0)
    core = plane[sz:, sy:]
    twin = torch.flip(core, dims=(0, 1)).conj()
    out[sz:, sy:, 0] = core + twin
    return out
