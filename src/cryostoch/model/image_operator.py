"""Image side of the likelihood: data blocks, rotated samples, CTF and un-shift phases.

Every image is transformed once (at load time) into an oversampled half-spectrum block; an
in-plane rotation by psi_p is then a cubic read of that block at the rotated points
q = Rz(psi_p) k (`cryostoch.operators.inplane`), so one central slice per direction serves
every in-plane angle. The CTF is evaluated at the same rotated points and the shift quadrature
enters as phases exp(+2 pi i q.t / N) applied to the rotated samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.fourier.grids import HalfPlaneCoefficients
from cryostoch.fourier.spectrum import PrunedDft, SpectrumLayout
from cryostoch.operators.ctf import CtfGrid, CtfParameters, evaluate_ctf
from cryostoch.operators.inplane import (
    cubic_interpolation_matrix,
    hermitian_extend,
    inplane_sample_points,
    sample_blocks,
)
from cryostoch.operators.shift import shift_phases


@dataclass(frozen=True)
class ImageTerms:
    """Rotated data and CTF factors of a chunk of b images.

    rotated: (b, P, M) complex, image i read at the points rotated by psi_p (not shifted).
    weighted_ctf: (b, P, M) real, w_k C_ip(k) (twin weights times CTF).
    weighted_ctf2: (b, P, M) real, w_k C_ip(k)^2.
    """

    rotated: Tensor
    weighted_ctf: Tensor
    weighted_ctf2: Tensor


class ImageOperator:
    """Image blocks and their rotated, shifted samples for one quadrature and cutoff."""

    def __init__(
        self,
        box_size: int,
        pixel_size_a: float,
        max_radius_px: float,
        oversampling: int,
        coefficients: HalfPlaneCoefficients,
        inplane_angles_rad: Tensor,
        shifts_px: Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.box_size = box_size
        self.dtype = dtype
        self.complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.coefficients = coefficients
        self.n_inplane = int(inplane_angles_rad.shape[0])
        # blocks large enough for cubic reads at every rotated point
        self.layout = SpectrumLayout(box_size, max_radius_px + 2.5 / oversampling + 1e-6,
                                     oversampling)
        self.dft = PrunedDft.create(self.layout, dtype=dtype, device=device)
        qx, qy = inplane_sample_points(coefficients.kx, coefficients.ky,
                                       inplane_angles_rad.to(**f64))  # (P, M) each
        self.interpolation = cubic_interpolation_matrix(
            qx, qy, self.layout.half_width, oversampling
        ).to(dtype)
        scale = 1.0 / (box_size * pixel_size_a)
        self.rotated_freq_x_per_a = (qx * scale).unsqueeze(0)  # (1, P, M) float64 for the CTF
        self.rotated_freq_y_per_a = (qy * scale).unsqueeze(0)
        self.ctf_grid = CtfGrid(qx * scale, qy * scale)  # CTF of any particle at (P, M)
        # un-shift phases exp(+2 pi i q.t / N), laid out (P, T, M)
        phases = shift_phases(qx, qy, shifts_px.to(**f64), box_size).conj()
        self.unshift = phases.permute(1, 0, 2).contiguous().to(self.complex_dtype)
        # exact-grid positions of the coefficients in an image block (for ||I||^2 in the disc)
        h = self.layout.half_width
        self._grid_rows = (coefficients.ky * oversampling + h).long()
        self._grid_cols = (coefficients.kx * oversampling).long()
        self.weights_k = coefficients.weights.to(dtype)  # (M,)

    @property
    def n_points(self) -> int:
        return self.coefficients.n_points

    def image_blocks(self, images: Tensor) -> Tensor:
        """Real images (B, N, N) -> oversampled half spectrum blocks (B, 2h+1, h+1)."""
        n = self.box_size
        if images.shape[-1] != n or images.shape[-2] != n:
            raise ValueError(f"images must be {n} x {n}")
        return self.dft.images(images.to(device=self.unshift.device, dtype=self.dtype))

    def crop_blocks(self, blocks: Tensor) -> Tensor:
        """(B, 2H+1, H+1) blocks made for a larger cutoff (same oversampling) -> (B, 2h+1, h+1)."""
        h = self.layout.half_width
        big = (blocks.shape[-2] - 1) // 2
        if big < h:
            raise ValueError("image blocks are smaller than this model's cutoff needs")
        if big == h:
            return blocks
        return blocks[..., big - h : big + h + 1, : h + 1]

    def image_coefficients(self, blocks: Tensor) -> Tensor:
        """(B, 2H+1, H+1) blocks -> unrotated, unshifted coefficients (B, M) on the DFT grid."""
        blocks = self.crop_blocks(blocks)
        return blocks[:, self._grid_rows, self._grid_cols]

    def data_norm(self, blocks: Tensor) -> Tensor:
        """(b, 2h+1, h+1) cropped blocks -> (b,) sum_k w_k |I(k)|^2 inside the cutoff disc."""
        coeffs = self.image_coefficients(blocks)
        return (coeffs.real**2 + coeffs.imag**2) @ self.weights_k

    def ctf_values(self, ctf: CtfParameters) -> Tensor:
        """(B,) CTF parameters -> (B, P, M) CTF at every rotated point, in the model's dtype."""
        return self.ctf_grid(ctf, self.dtype)

    def mean_ctf2(self, ctf: CtfParameters) -> Tensor:
        """(M,) float64 mean of C^2 over the given particles and in-plane angles."""
        device = self.rotated_freq_x_per_a.device
        return evaluate_ctf(ctf.to(device=device), self.rotated_freq_x_per_a,
                            self.rotated_freq_y_per_a).pow(2).mean((0, 1))

    def terms(self, blocks: Tensor, ctf_values: Tensor) -> ImageTerms:
        """(b, 2h+1, h+1) cropped blocks and their (b, P, M) CTF -> `ImageTerms`."""
        full = hermitian_extend(blocks.to(self.complex_dtype))
        rotated = sample_blocks(full, self.interpolation, (self.n_inplane, self.n_points))
        wc = ctf_values * self.weights_k
        return ImageTerms(rotated, wc, wc * ctf_values)
