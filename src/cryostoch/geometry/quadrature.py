"""Quadrature over rotations (S^2 x S^1) and in-plane shifts (a disc).

Sizes follow from the cutoff radius ``r`` in Fourier pixels (cycles per box), see DESIGN.md
"Marginalise rotation and shift": angular step ``d = atan(1 / r)`` (the rotation that moves the
outermost used frequency by one voxel); the smallest Lebedev rule with at least ``(3.6 / d)^2``
points; ``ceil(2 pi / d)`` uniform in-plane angles. Above the largest Lebedev rule (5810 points)
the directions are a Fibonacci (golden-spiral) grid with equal weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from cryostoch.geometry.rotations import direction_to_euler, euler_to_matrix

__all__ = [
    "DIRECTION_DENSITY_FACTOR",
    "OrientationQuadrature",
    "ShiftQuadrature",
    "angular_step_rad",
    "default_shift_step_px",
    "lebedev_sizes",
    "max_radius_px",
    "orientation_quadrature",
    "shift_quadrature",
    "sphere_rule",
]

#: ``(DIRECTION_DENSITY_FACTOR / d)^2`` is the minimum number of directions for step ``d``.
DIRECTION_DENSITY_FACTOR = 3.6


def _positive_finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# Step sizes
# --------------------------------------------------------------------------------------------

def max_radius_px(box_size: int, max_freq_fraction_of_nyquist: float) -> float:
    """Cutoff radius in Fourier pixels (cycles per box): ``fraction * box_size / 2``."""
    if isinstance(box_size, bool) or int(box_size) != box_size or box_size < 2:
        raise ValueError(f"box_size must be an integer >= 2, got {box_size!r}")
    f = _positive_finite(max_freq_fraction_of_nyquist, "max_freq_fraction_of_nyquist")
    if f > 1:
        raise ValueError(f"max_freq_fraction_of_nyquist must be in (0, 1], got {f}")
    return f * int(box_size) / 2


def angular_step_rad(max_radius_px: float) -> float:
    """Angular step ``atan(1 / r)``: the rotation that moves frequency radius ``r`` by one pixel."""
    r = _positive_finite(max_radius_px, "max_radius_px")
    return math.atan(1.0 / r)


def default_shift_step_px(box_size: int, max_radius_px: float) -> float:
    """Shift step (pixels) that moves the phase of frequency radius ``r`` by one radian:
    ``box_size / (2 pi r)``."""
    n = _positive_finite(box_size, "box_size")
    r = _positive_finite(max_radius_px, "max_radius_px")
    return n / (2 * math.pi * r)


# --------------------------------------------------------------------------------------------
# Directions on the sphere
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _lebedev_table() -> tuple[tuple[int, int, bool], ...]:
    """``(n_points, order, all_weights_positive)`` of every order scipy accepts, by size."""
    from scipy.integrate import lebedev_rule

    table = []
    for order in range(1, 200):
        try:
            x, w = lebedev_rule(order)
        except (NotImplementedError, ValueError):
            continue
        table.append((int(x.shape[1]), order, bool(np.all(w > 0))))
    if not table:  # pragma: no cover - depends on scipy
        raise RuntimeError("scipy.integrate.lebedev_rule accepts no order")
    return tuple(sorted(table))


def lebedev_sizes(*, positive_weights_only: bool = True) -> tuple[int, ...]:
    """Point counts of the available Lebedev rules (by default only those whose weights are all
    positive: scipy's 74-, 230- and 266-point rules have negative weights, which a
    log-sum-exp over log-weights cannot use)."""
    return tuple(n for n, _, pos in _lebedev_table() if pos or not positive_weights_only)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = i * (math.pi * (3.0 - math.sqrt(5.0)))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def sphere_rule(
    min_points: float,
    *,
    positive_weights_only: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Quadrature on the unit sphere with at least ``min_points`` points.

    Returns ``(directions (D, 3), weights (D,))`` with weights summing to 1 (so the rule
    computes the mean over the sphere). This is the smallest Lebedev rule of
    ``scipy.integrate.lebedev_rule`` with ``D >= min_points`` (skipping rules with negative
    weights unless ``positive_weights_only=False``); above the largest rule (5810 points) it is a
    Fibonacci (golden-spiral) grid of exactly ``ceil(min_points)`` points with equal weights.
    """
    m = _positive_finite(min_points, "min_points")
    for n_points, order, positive in _lebedev_table():
        if n_points >= m and (positive or not positive_weights_only):
            from scipy.integrate import lebedev_rule

            x, w = lebedev_rule(order)
            directions = np.ascontiguousarray(x.T, dtype=np.float64)
            weights = np.asarray(w, dtype=np.float64) / np.sum(w)
            break
    else:
        n = math.ceil(m)
        directions = _fibonacci_sphere(n)
        weights = np.full(n, 1.0 / n)
    return (
        torch.as_tensor(directions, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


# --------------------------------------------------------------------------------------------
# Orientations: directions x in-plane angles
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class OrientationQuadrature:
    """Rotations ``A = Rz(psi_p) @ A_d`` on the grid directions x in-plane angles.

    ``A_d`` is the psi = 0 rotation whose projection direction ``A_d^T e_z`` is direction ``d``;
    the flat index of ``(d, p)`` is ``d * P + p``. Weights: ``w_d / P`` (sum 1).
    """

    directions: Tensor  # (D, 3) unit vectors
    direction_weights: Tensor  # (D,), sum 1
    direction_matrices: Tensor  # (D, 3, 3)
    inplane_angles_rad: Tensor  # (P,), 2 pi p / P

    def __post_init__(self) -> None:
        d = self.directions.shape[0] if self.directions.dim() == 2 else -1
        if self.directions.shape != (d, 3) or d < 1:
            raise ValueError(
                f"directions must have shape (D, 3), got {tuple(self.directions.shape)}"
            )
        if self.direction_weights.shape != (d,):
            raise ValueError("direction_weights must have shape (D,)")
        if self.direction_matrices.shape != (d, 3, 3):
            raise ValueError("direction_matrices must have shape (D, 3, 3)")
        if self.inplane_angles_rad.dim() != 1 or self.inplane_angles_rad.numel() < 1:
            raise ValueError("inplane_angles_rad must have shape (P,) with P >= 1")

    @property
    def n_directions(self) -> int:
        return int(self.directions.shape[0])

    @property
    def n_inplane(self) -> int:
        return int(self.inplane_angles_rad.shape[0])

    @property
    def size(self) -> int:
        return self.n_directions * self.n_inplane

    def matrices(self) -> Tensor:
        """All ``(D * P, 3, 3)`` rotations, index ``d * P + p``."""
        c = torch.cos(self.inplane_angles_rad)
        s = torch.sin(self.inplane_angles_rad)
        z = torch.zeros_like(c)
        o = torch.ones_like(c)
        rz = torch.stack(
            [torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)],
            dim=-2,
        )  # (P, 3, 3)
        out = rz[None, :, :, :] @ self.direction_matrices[:, None, :, :]
        return out.reshape(-1, 3, 3)

    def euler_deg(self) -> Tensor:
        """All ``(D * P, 3)`` Euler angles ``(rot, tilt, psi)`` in degrees, index ``d * P + p``;
        psi in [0, 360)."""
        e = direction_to_euler(self.directions)  # (D, 3), psi = 0
        psi = torch.rad2deg(self.inplane_angles_rad)
        rt = e[:, None, :2].expand(-1, self.n_inplane, 2)
        ps = psi[None, :, None].expand(self.n_directions, -1, 1)
        return torch.cat([rt, ps], dim=-1).reshape(-1, 3)

    def log_weights(self) -> Tensor:
        """``(D * P,)`` log quadrature weights ``log(w_d / P)``, index ``d * P + p``."""
        lw = torch.log(self.direction_weights) - math.log(self.n_inplane)
        return lw.repeat_interleave(self.n_inplane)


def orientation_quadrature(
    max_radius_px: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> OrientationQuadrature:
    """Quadrature over SO(3) for a cutoff radius of ``max_radius_px`` Fourier pixels.

    Step ``d = atan(1 / r)``; the smallest (positive-weight) Lebedev rule with at least
    ``(3.6 / d)^2`` directions (Fibonacci grid above 5810); ``P = ceil(2 pi / d)`` in-plane
    angles ``2 pi p / P``. Box 128 at 16% of Nyquist (r = 10.24) gives 1454 x 65.
    """
    step = angular_step_rad(max_radius_px)
    directions, weights = sphere_rule(
        (DIRECTION_DENSITY_FACTOR / step) ** 2, dtype=dtype, device=device
    )
    n_inplane = math.ceil(2 * math.pi / step)
    angles = torch.arange(n_inplane, dtype=dtype, device=device) * (2 * math.pi / n_inplane)
    matrices = euler_to_matrix(direction_to_euler(directions))
    return OrientationQuadrature(directions, weights, matrices, angles)


# --------------------------------------------------------------------------------------------
# Shifts
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ShiftQuadrature:
    """In-plane shifts ``(tx, ty)`` in pixels and their log weights (``logsumexp = 0``)."""

    shifts_px: Tensor  # (T, 2) (tx, ty)
    log_weights: Tensor  # (T,)

    def __post_init__(self) -> None:
        t = self.shifts_px.shape[0] if self.shifts_px.dim() == 2 else -1
        if self.shifts_px.shape != (t, 2) or t < 1:
            raise ValueError(f"shifts_px must have shape (T, 2), got {tuple(self.shifts_px.shape)}")
        if self.log_weights.shape != (t,):
            raise ValueError("log_weights must have shape (T,)")

    @property
    def size(self) -> int:
        return int(self.shifts_px.shape[0])


def shift_quadrature(
    radius_px: float,
    step_px: float,
    sigma_px: float,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> ShiftQuadrature:
    """Uniform grid ``step_px * (i, j)`` over the disc ``|t| <= radius_px`` (always containing
    (0, 0)), weighted by a normal prior ``N(0, sigma_px^2 I)`` truncated to the disc
    (``sigma_px = inf``: uniform). ``radius_px = 0`` gives the origin alone with weight 1.

    Shifts are ordered with ty as the outer and tx as the inner index.
    """
    try:
        radius = float(radius_px)
    except (TypeError, ValueError):
        raise ValueError(f"radius_px must be a number, got {radius_px!r}") from None
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius_px must be non-negative and finite, got {radius_px!r}")
    step = _positive_finite(step_px, "step_px")
    try:
        sigma = float(sigma_px)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_px must be a number, got {sigma_px!r}") from None
    if math.isnan(sigma) or sigma <= 0:
        raise ValueError(f"sigma_px must be positive (or inf), got {sigma_px!r}")

    tol = 1e-9
    m = math.floor(radius / step + tol)
    k = np.arange(-m, m + 1, dtype=np.float64) * step
    ty, tx = np.meshgrid(k, k, indexing="ij")
    r2 = tx * tx + ty * ty
    inside = r2 <= radius * radius * (1 + 2 * tol) + tol * step * step
    shifts = np.stack([tx[inside], ty[inside]], axis=1)
    if math.isinf(sigma):
        logw = np.zeros(shifts.shape[0])
    else:
        logw = -r2[inside] / (2 * sigma * sigma)
    top = logw.max()
    logw = logw - (top + np.log(np.exp(logw - top).sum()))
    return ShiftQuadrature(
        torch.as_tensor(shifts, dtype=dtype, device=device),
        torch.as_tensor(logw, dtype=dtype, device=device),
    )
