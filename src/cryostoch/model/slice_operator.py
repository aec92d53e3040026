"""Volume side of the likelihood: real volume -> central slices S_d, and the exact adjoint.

The chain is volume (N, N, N) real -> oversampled spectrum block (Kz, Ky, Kx) complex (pruned
DFT, `cryostoch.fourier.spectrum`) -> psi = 0 slices (D, M) complex (trilinear reads with a
stencil that depends only on the quadrature, so it is computed once). `volume_gradient` runs
the adjoint of the whole chain: the gradient of a real loss with respect to the slices (torch's
complex convention) back to the real volume, optionally through a Fourier preconditioner that
acts on the block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryostoch.fourier.grids import HalfPlaneCoefficients
from cryostoch.fourier.spectrum import PrunedDft, SpectrumLayout
from cryostoch.operators.slicing import slice_points_3d, trilinear_stencil


class SliceOperator:
    """Volume -> slices of one quadrature's directions on one device and dtype.

    direction_matrices: (D, 3, 3) psi = 0 rotations; coefficients: the M half-plane points.
    """

    def __init__(
        self,
        box_size: int,
        max_radius_px: float,
        oversampling: int,
        direction_matrices: Tensor,
        coefficients: HalfPlaneCoefficients,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.box_size = box_size
        self.oversampling = oversampling
        self.dtype = dtype
        # a block just large enough for trilinear reads at the cutoff
        self.layout = SpectrumLayout(box_size, max_radius_px + 1.0 / oversampling + 1e-6,
                                     oversampling)
        self.dft = PrunedDft.create(self.layout, dtype=dtype, device=device)
        self.direction_matrices = direction_matrices  # (D, 3, 3) float64
        self.coefficients = coefficients
        self._stencil: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return (self.layout.centred_length,) * 2 + (self.layout.half_length,)

    def block(self, volume: Tensor) -> Tensor:
        """(N, N, N) real -> (Kz, Ky, Kx) complex spectrum block (differentiable)."""
        return self.dft.volume(volume)

    def _stencil_for(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(flat indices (D*M*8,), weights * sqrt(N) (D, M, 8), conjugation flags (D, M))."""
        if self._stencil is None:
            points = slice_points_3d(
                self.direction_matrices, self.coefficients.kx, self.coefficients.ky
            )
            idx, w, flip = trilinear_stencil(points, tuple(shape), self.oversampling)
            # sqrt(N): a central slice of the unitary 3-D spectrum is the projection's
            # spectrum divided by sqrt(N) (unitary 2-D transform of a sum over N voxels)
            scale = math.sqrt(self.box_size)
            self._stencil = (idx.reshape(-1), (w * scale).to(self.dtype), flip)
        return self._stencil

    def slices_from_block(self, block: Tensor) -> Tensor:
        """(Kz, Ky, Kx) complex block -> (D, M) complex psi = 0 projection spectra S_d."""
        idx, w, flip = self._stencil_for(block.shape)
        values = (block.reshape(-1)[idx].reshape(w.shape) * w).sum(-1)
        return torch.where(flip, values.conj(), values)

    def slices(self, volume: Tensor) -> Tensor:
        """(N, N, N) real -> (D, M) complex slices; differentiable."""
        return self.slices_from_block(self.block(volume))

    def block_adjoint(self, slice_gradient: Tensor) -> Tensor:
        """Adjoint of `slices_from_block`: (D, M) complex dL/dS -> (Kz, Ky, Kx) complex dL/dblock.

        The trilinear insertion: every slice value adds its (conjugated where the read was
        conjugated) gradient times the read weights into the eight corners it was read from.
        """
        idx, w, flip = self._stencil_for(self.block_shape)
        g = torch.where(flip, slice_gradient.conj(), slice_gradient)
        contributions = (g.unsqueeze(-1) * w).reshape(-1)
        out = torch.zeros(math.prod(self.block_shape), dtype=contributions.dtype,
                          device=contributions.device)
        out.index_put_((idx,), contributions, accumulate=True)
        return out.reshape(self.block_shape)

    def volume_gradient(self, slice_gradient: Tensor, preconditioner: Tensor | None = None
                        ) -> Tensor:
        """(D, M) complex dL/dS -> (N, N, N) real dL/dV for a real loss L.

        preconditioner: optional real (Kz, Ky, Kx) weights applied on the block (a fixed
        change of metric, see `cryostoch.model.objective.fourier_preconditioner`).
        """
        block_gradient = self.block_adjoint(slice_gradient)
        if preconditioner is not None:
            block_gradient = block_gradient * preconditioner
        return self.dft.volume_adjoint(block_gradient)
