"""In-plane rotations applied on the image side.

For a rotation A = Rz(psi) A_d, the model's spectrum at image frequency k is the psi = 0 slice
S_d at Rz(psi)^T k. Substituting k = Rz(psi) k' turns the sum over the image's frequencies into a
sum over the slice's fixed grid k', with the image (and its CTF) read at q = Rz(psi) k'. So one
slice per direction serves every in-plane angle, and the images are resampled instead. The
paper's authors rotated images for the same reason; it makes the volume interpolation cost
independent of the number of in-plane angles.

Images are kept as oversampled spectrum blocks (exact DTFT values on a grid of spacing
1/oversampling, see `cryostoch.fourier.spectrum`) and read with Keys' cubic convolution
(a = -0.5), expressed as one sparse matrix shared by all images.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def inplane_sample_points(kx: Tensor, ky: Tensor, angles_rad: Tensor) -> tuple[Tensor, Tensor]:
    """q = Rz(psi) k for every angle: (P, M) x and y frequencies (passive Rz, as RELION)."""
    c = torch.cos(angles_rad.to(kx.dtype)).unsqueeze(-1)
    s = torch.sin(angles_rad.to(kx.dtype)).unsqueeze(-1)
    return c * kx + s * ky, -s * kx + c * ky


def hermitian_extend(half_block: Tensor) -> Tensor:
    """(..., 2h+1, h+1) half block [ky, kx >= 0] -> (..., 2h+1, 2h+1) full block [ky, kx]."""
    h = half_block.shape[-1] - 1
    if half_block.shape[-2] != 2 * h + 1:
        raise ValueError("half block must have shape (..., 2h+1, h+1)")
    negative = torch.flip(half_block[..., :, 1:], dims=(-2, -1)).conj()  # kx = -h .. -1
    return torch.cat([negative, half_block], dim=-1)


def _keys_weights(t: Tensor) -> list[Tensor]:
    """Cubic convolution weights (a = -0.5) for taps at offsets -1, 0, 1, 2 from floor."""
    a = -0.5

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return (a + 2) * x**3 - (a + 3) * x**2 + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def cubic_interpolation_matrix(
    qx: Tensor, qy: Tensor, half_width: int, oversampling: int
) -> Tensor:
    """Sparse (n_points, L*L) matrix reading a full block (L = 2h+1) at frequencies (qx, qy).

    Points must lie at least two grid steps inside the block. Rows follow `qx.reshape(-1)`.
    """
    length = 2 * half_width + 1
    gx = qx.reshape(-1) * oversampling + half_width
    gy = qy.reshape(-1) * oversampling + half_width
    if gx.min() < 1 or gy.min() < 1 or gx.max() > length - 3 or gy.max() > length - 3:
        raise ValueError("interpolation points too close to the edge of the spectrum block")
    x0, y0 = gx.floor(), gy.floor()
    wx, wy = _keys_weights(gx - x0), _keys_weights(gy - y0)
    rows, cols, vals = [], [], []
    point = torch.arange(gx.shape[0], device=qx.device)
    for j, wyj in enumerate(wy):
        iy = (y0 + j - 1).long()
        for i, wxi in enumerate(wx):
            ix = (x0 + i - 1).long()
            rows.append(point)
            cols.append(iy * length + ix)
            vals.append(wyj * wxi)
    indices = torch.stack([torch.cat(rows), torch.cat(cols)])
    matrix = torch.sparse_coo_tensor(
        indices,
        torch.cat(vals),
        (gx.shape[0], length * length),
        dtype=qx.dtype,
        check_invariants=False,
    )
    with warnings.catch_warnings():  # CSR is "beta" in torch but is the fast path for spmm
        warnings.simplefilter("ignore", UserWarning)
        return matrix.coalesce().to_sparse_csr()


def sample_blocks(full_blocks: Tensor, matrix: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """Apply an interpolation matrix to complex blocks (B, L, L) -> (B, *out_shape)."""
    b = full_blocks.shape[0]
    flat = torch.view_as_real(full_blocks.reshape(b, -1).contiguous())  # (B, L*L, 2)
    dense = flat.permute(1, 0, 2).reshape(flat.shape[1], 2 * b)  # (L*L, 2B)
    out = (matrix @ dense).reshape(-1, b, 2).permute(1, 0, 2).contiguous()
    return torch.view_as_complex(out).reshape(b, *out_shape)
