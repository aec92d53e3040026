"""Rigid transforms of maps: rotation (with shift), change of hand, soft spherical masks.

Convention (docs/conventions.md): coordinates `(x, y, z)` are relative to the box centre `N // 2`
and the array is `V[z, y, x]`. `rotate_volume(V, A, s)` is

    V'(x) = V(A^T (x - s)),

i.e. the map is rotated about the box centre by `A` (a density feature at `c` moves to `A c`)
and then translated by `s` pixels (to `A c + s`). With this convention the projection of the
rotated map along z is the RELION projection of `V` at `A`:
`sum_z rotate_volume(V, A)[z, y, x] = integral V(A^T (x, y, z)) dz`.

Resampling is trilinear (`torch.nn.functional.grid_sample`, `align_corners=True`, so that
normalised coordinate -1 is index 0 and +1 is index N-1); with `oversampling > 1` the map is first
upsampled by Fourier padding, which makes the interpolation nearly exact for band-limited maps.
Samples falling outside the box read zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cryostoch.fourier import irfft3c, pad_real_space, resample_volume, rfft3_grid, rfft3c

__all__ = [
    "centred_coordinates",
    "homogeneous_coordinates",
    "mirror_volume",
    "resample_onto_grid",
    "rotate_volume",
    "sampling_grid",
    "shift_volume",
    "soft_sphere_mask",
]


def _check_cubic(volume: Tensor, name: str = "volume") -> int:
    if volume.dim() < 3:
        raise ValueError(f"{name} must have shape (..., N, N, N), got {tuple(volume.shape)}")
    n = volume.shape[-1]
    if tuple(volume.shape[-3:]) != (n, n, n):
        raise ValueError(f"{name} must be cubic, got shape {tuple(volume.shape)}")
    return n


def centred_coordinates(n: int, *, dtype=torch.float32, device=None) -> Tensor:
    """`(n, n, n, 3)` coordinates `(x, y, z)` of every voxel `[z, y, x]`, relative to `n // 2`."""
    k = torch.arange(n, dtype=dtype, device=device) - n // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def homogeneous_coordinates(n: int, *, dtype=torch.float32, device=None) -> Tensor:
    """`(n^3, 4)` rows `(x, y, z, 1)` of the voxels `[z, y, x]` (C order), relative to `n // 2`."""
    x = centred_coordinates(n, dtype=dtype, device=device).reshape(-1, 3)
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def sampling_grid(
    matrices: Tensor,
    box_size: int,
    shifts_px: Tensor | None = None,
    *,
    source_size: int | None = None,
    scale: float = 1.0,
    coordinates: Tensor | None = None,
) -> Tensor:
    """`(B, n, n, n, 3)` normalised `grid_sample` coordinates (`align_corners=True`) of
    `A^T (x - s)` for every output voxel `x` of an `n = box_size` box, for `(B, 3, 3)` matrices
    and optional `(B, 3)` shifts `(x, y, z)` in pixels. The source box has `source_size` voxels a
    side (default `box_size`) with `scale` source voxels per output voxel (an oversampled
    source). `coordinates`: `homogeneous_coordinates(n)`, if already at hand. The dtype and
    device are those of `matrices`; the result may be a non-contiguous view."""
    dtype, device = matrices.dtype, matrices.device
    b = matrices.shape[0]
    m = source_size if source_size is not None else box_size
    if coordinates is None:
        coordinates = homogeneous_coordinates(box_size, dtype=dtype, device=device)
    # g = alpha * (x - s)^T A + beta, as one product with the rows (x, y, z, 1)
    alpha = scale * 2.0 / (m - 1) if m > 1 else 0.0
    beta = (m // 2) * 2.0 / (m - 1) - 1.0 if m > 1 else 0.0
    affine = torch.empty(b, 4, 3, dtype=dtype, device=device)
    affine[:, :3] = alpha * matrices
    if shifts_px is None:
        affine[:, 3] = beta
    else:
        s = shifts_px.to(dtype=dtype, device=device).reshape(b, 1, 3)
        affine[:, 3] = beta - alpha * (s @ matrices)[:, 0]
    out = coordinates @ affine.permute(1, 0, 2).reshape(4, 3 * b)  # (n^3, 3B)
    return out.reshape(box_size, box_size, box_size, b, 3).permute(3, 0, 1, 2, 4)


def rotate_volume(
    volume: Tensor,
    matrix: Tensor,
    shift_px: Tensor | None = None,
    *,
    oversampling: int = 1,
) -> Tensor:
    """Rotate a map about the box centre by `A` and then shift it: `V'(x) = V(A^T (x - s))`.

    `volume`: `(N, N, N)` (or `(B, N, N, N)` with `B` matrices); `matrix`: `(3, 3)` or
    `(B, 3, 3)` rotation(s) `A` (RELION's matrix of the Euler angles, see module docstring);
    `shift_px`: optional `(3,)` or `(B, 3)` translation `(x, y, z)` in pixels, applied after the
    rotation. Returns `(N, N, N)` for a single matrix, `(B, N, N, N)` for a batch, in the dtype
    and on the device of `volume`. A feature at `c` ends up at `A c + s`; projecting the result
    along z gives the RELION projection of `volume` at `A`.
    """
    n = _check_cubic(volume)
    if not volume.is_floating_point():
        volume = volume.to(torch.float32)
    mats = torch.as_tensor(matrix)
    single = mats.dim() == 2
    mats = mats.reshape(-1, 3, 3).to(dtype=volume.dtype, device=volume.device)
    b = mats.shape[0]
    shifts = None
    if shift_px is not None:
        shifts = torch.as_tensor(shift_px).to(dtype=volume.dtype, device=volume.device)
        shifts = shifts.reshape(-1, 3).expand(b, 3)
    if volume.dim() == 4 and volume.shape[0] in (1, b):
        single = False
    elif volume.dim() != 3:
        raise ValueError(
            f"volume {tuple(volume.shape)} and matrix {tuple(mats.shape)} do not match"
        )
    if oversampling < 1 or int(oversampling) != oversampling:
        raise ValueError(f"oversampling must be a positive integer, got {oversampling!r}")
    m = n * int(oversampling)
    source = resample_volume(volume, m) if m != n else volume
    source = source.reshape(-1, 1, m, m, m).expand(b, 1, m, m, m)
    grid = sampling_grid(mats, n, shifts, source_size=m, scale=m / n)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out[:, 0]
    return out[0] if single else out


def resample_onto_grid(
    volume: Tensor,
    pixel_size_a: float,
    box_size: int,
    new_pixel_size_a: float,
    *,
    oversampling: int | None = None,
) -> Tensor:
    """A map `(N, N, N)` of `pixel_size_a` voxels sampled on a `box_size`^3 grid of
    `new_pixel_size_a` voxels, the box centres `N // 2` and `box_size // 2` at the same place
    (another map's grid: a different box, pixel size or both). Samples outside the source box
    read zero.

    The same pixel size (within 1e-4) is a real-space crop or zero-pad, exact. Otherwise a
    coarser grid first Fourier-crops the map to a box whose voxels are at least as large as the
    new ones (no aliasing); then the map is upsampled by Fourier padding (`oversampling`, default
    2 up to 160 voxels, else 1) and read by trilinear interpolation, as `rotate_volume`.
    Returns `(box_size,)*3` in the volume's dtype and device.
    """
    n = _check_cubic(volume)
    if volume.dim() != 3:
        raise ValueError(f"volume must be (N, N, N), got {tuple(volume.shape)}")
    for name, value in (("pixel size", pixel_size_a), ("new pixel size", new_pixel_size_a)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    if box_size < 1:
        raise ValueError(f"box size must be positive, got {box_size}")
    if not volume.is_floating_point():
        volume = volume.to(torch.float32)
    ratio = new_pixel_size_a / pixel_size_a  # source voxels per new voxel
    if abs(ratio - 1.0) <= 1e-4:
        if box_size >= n:
            return pad_real_space(volume, box_size, 3)
        start = n // 2 - box_size // 2
        w = slice(start, start + box_size)
        return volume[w, w, w].clone()
    source, step = volume, pixel_size_a
    if ratio > 1:  # band-limit to (at most) the new grid's Nyquist frequency
        m = max(2, math.floor(n / ratio))
        source, step = resample_volume(volume, m), pixel_size_a * n / m
    if oversampling is None:
        oversampling = 2 if source.shape[-1] <= 160 else 1
    if oversampling < 1 or int(oversampling) != oversampling:
        raise ValueError(f"oversampling must be a positive integer, got {oversampling!r}")
    if oversampling > 1:
        m = source.shape[-1] * int(oversampling)
        step = step * source.shape[-1] / m
        source = resample_volume(source, m)
    m = source.shape[-1]
    identity = torch.eye(3, dtype=volume.dtype, device=volume.device)[None]
    grid = sampling_grid(identity, box_size, source_size=m, scale=new_pixel_size_a / step)
    out = F.grid_sample(source.reshape(1, 1, m, m, m), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[0, 0]


def shift_volume(volume: Tensor, shift_px: Tensor) -> Tensor:
    """Translate a map by `shift_px` `(x, y, z)` pixels, `V'(x) = V(x - s)`, exactly for a
    band-limited map (a Fourier phase ramp; periodic: what leaves one face enters the opposite).

    `volume`: `(N, N, N)` real; `shift_px`: `(3,)`. Returns `(N, N, N)` in the volume's dtype.
    """
    n = _check_cubic(volume)
    spectrum = rfft3c(volume)
    kz, ky, kx = rfft3_grid(n, dtype=torch.float64, device=volume.device)
    s = torch.as_tensor(shift_px, dtype=torch.float64, device=volume.device).reshape(3)
    phase = (kx * s[0] + ky * s[1] + kz * s[2]) * (-2 * math.pi / n)
    ramp = torch.polar(torch.ones_like(phase), phase).to(spectrum.dtype)
    return irfft3c(spectrum * ramp, n).to(volume.dtype)


def mirror_volume(volume: Tensor) -> Tensor:
    """Flip the hand: reverse the z axis about the box centre, `V'(x, y, z) = V(x, y, -z)`.

    With the centre at `N // 2`, output plane `z` reads input plane `(N - z) mod N` for even `N`
    (the outermost plane, z = -N/2, whose mirror image lies outside the box, maps onto itself)
    and `N - 1 - z` for odd `N`. Applying it twice gives the original map.
    """
    n = _check_cubic(volume)
    flipped = torch.flip(volume, dims=(-3,))
    if n % 2 == 0:
        flipped = torch.roll(flipped, shifts=1, dims=-3)
    return flipped


def soft_sphere_mask(
    box_size: int,
    radius_px: float,
    *,
    edge_px: float = 5.0,
    dtype=torch.float32,
    device=None,
) -> Tensor:
    """`(N, N, N)` mask: 1 within `radius_px` of the box centre `N // 2`, falling to 0 along a
    raised cosine over the next `edge_px` pixels (a hard mask when `edge_px` is 0)."""
    if not (math.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"mask radius must be positive, got {radius_px!r}")
    if not (math.isfinite(edge_px) and edge_px >= 0):
        raise ValueError(f"mask edge width must be non-negative, got {edge_px!r}")
    r = centred_coordinates(box_size, dtype=torch.float64, device=device).norm(dim=-1)
    if edge_px == 0:
        mask = (r <= radius_px).to(torch.float64)
    else:
        t = ((r - radius_px) / edge_px).clamp(0.0, 1.0)
        mask = 0.5 * (1.0 + torch.cos(math.pi * t))
    return mask.to(dtype)
