"""The flat pose index of a quadrature point and its decoding into angles and shifts.

A quadrature point is (direction d, in-plane angle p, shift t); posteriors, best poses and
candidate lists address it by one integer, `(d * P + p) * T + t`, so that a per-image argmax
over the whole quadrature is one integer per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.geometry.quadrature import OrientationQuadrature, ShiftQuadrature
from cryostoch.geometry.rotations import direction_to_euler


@dataclass(frozen=True)
class PoseGrid:
    """Sizes of the (directions x in-plane angles x shifts) product grid."""

    n_directions: int
    n_inplane: int
    n_shifts: int

    @property
    def size(self) -> int:
        return self.n_directions * self.n_inplane * self.n_shifts

    def flat_index(self, direction: Tensor, inplane: Tensor, shift: Tensor) -> Tensor:
        """(n,) integer indices of each kind -> (n,) flat pose indices."""
        return (direction * self.n_inplane + inplane) * self.n_shifts + shift

    def decode(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(n,) flat pose indices -> (direction, in-plane, shift) indices, each (n,)."""
        t = index % self.n_shifts
        dp = index // self.n_shifts
        return dp // self.n_inplane, dp % self.n_inplane, t

    def from_chunk_argmax(self, chunk_arg: Tensor, d0: int, chunk_directions: int) -> Tensor:
        """An argmax over a row-major (P, T, Dc) block of directions d0:d0+Dc -> flat index.

        chunk_arg: (n,) indices into the flattened (P, T, Dc) block.
        """
        d_local = chunk_arg % chunk_directions
        pt = chunk_arg // chunk_directions
        return self.flat_index(d_local + d0, pt // self.n_shifts, pt % self.n_shifts)


def pose_parameters(
    grid: PoseGrid,
    orientations: OrientationQuadrature,
    shifts: ShiftQuadrature,
    index: Tensor,
) -> tuple[Tensor, Tensor]:
    """Flat pose indices (n,) -> RELION Euler angles (n, 3) in degrees and shifts (n, 2) px."""
    device = orientations.directions.device
    d, p, t = grid.decode(index.to(device))
    euler = direction_to_euler(orientations.directions.to(torch.float64)[d]).clone()
    euler[:, 2] = torch.rad2deg(orientations.inplane_angles_rad.to(torch.float64)[p])
    return euler, shifts.shifts_px.to(torch.float64)[t]
