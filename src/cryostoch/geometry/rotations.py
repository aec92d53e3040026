"""Rotations: RELION ZYZ Euler angles, matrices, quaternions, rotation vectors.

Conventions (docs/conventions.md): Euler angles ``(rot, tilt, psi)`` in degrees define RELION's
``Euler_angles2matrix``, ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with the *passive* elementary
matrices ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(b) = [[c, 0, -s], [0, 1, 0],
[s, 0, c]]``. A projection integrates the volume along z after rotating it by ``A``; the beam
direction in the volume frame is ``A^T e_z = (sin tilt cos rot, sin tilt sin rot, cos tilt)``.

Quaternions are ``(w, x, y, z)``, scalar first, and represent the same matrix ``A`` through the
usual formula ``A = R(q)`` (``R(q) v = q v q*``); rotation vectors ``v`` give ``A = exp([v]_x)``
(the same as ``scipy.spatial.transform.Rotation.from_rotvec(v).as_matrix()``).

All functions are pure, batched over leading dimensions, and keep the dtype/device of their
inputs (non-floating inputs are promoted to float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "direction_to_euler",
    "euler_to_matrix",
    "euler_to_quaternion",
    "geodesic_angle_rad",
    "inplane_rotation",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotvec",
    "quaternion_multiply",
    "quaternion_to_euler",
    "quaternion_to_matrix",
    "random_rotations",
    "rotvec_to_matrix",
]


def _as_float(x) -> Tensor:
    """A floating-point tensor view of ``x`` (float64 when ``x`` is not floating)."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_last(t: Tensor, shape: tuple[int, ...], name: str) -> None:
    if t.dim() < len(shape) or tuple(t.shape[t.dim() - len(shape):]) != shape:
        raise ValueError(f"{name} must have shape (..., {', '.join(map(str, shape))}), "
                         f"got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# Euler angles <-> matrices
# --------------------------------------------------------------------------------------------

def euler_to_matrix(euler_deg: Tensor) -> Tensor:
    """RELION ``Euler_angles2matrix``: ``(..., 3)`` angles ``(rot, tilt, psi)`` in degrees to
    ``(..., 3, 3)`` matrices ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` (passive elementary rotations).
    """
    e = _as_float(euler_deg)
    _check_last(e, (3,), "euler_deg")
    rad = torch.deg2rad(e)
    ca, cb, cg = torch.cos(rad).unbind(-1)
    sa, sb, sg = torch.sin(rad).unbind(-1)
    cc = cb * ca
    cs = cb * sa
    rows = (
        (cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb),
        (-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb),
        (sb * ca, sb * sa, cb),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_euler(matrix: Tensor) -> Tensor:
    """RELION ``Euler_matrix2angles``: ``(..., 3, 3)`` rotation matrices to ``(..., 3)`` angles
    ``(rot, tilt, psi)`` in degrees, with tilt in [0, 180] and rot, psi in (-180, 180].

    Gimbal lock (``sin(tilt)`` below ``16 eps`` of the dtype, tilt snapped to 0 or 180): rot is
    set to 0 and the whole in-plane angle goes into psi, as RELION does. Away from it, psi is
    fitted to the matrix given the computed (rot, tilt), which keeps ``euler_to_matrix`` of the
    result equal to the input to rounding error even for tilt very close to 0 or 180.
    """
    a = _as_float(matrix)
    _check_last(a, (3, 3), "matrix")
    a20, a21, a22 = a[..., 2, 0], a[..., 2, 1], a[..., 2, 2]
    sin_tilt = torch.hypot(a20, a21)
    tol = 16 * torch.finfo(a.dtype).eps
    locked = sin_tilt <= tol
    zero = torch.zeros_like(sin_tilt)
    rot = torch.where(locked, zero, torch.atan2(a21, a20))
    tilt = torch.where(
        locked,
        torch.where(a22 >= 0, zero, torch.full_like(zero, math.pi)),
        torch.atan2(sin_tilt, a22),
    )
    # Rz(psi) = A @ (Ry(tilt) Rz(rot))^T; psi from its first row.
    m = euler_to_matrix(torch.stack([torch.rad2deg(rot), torch.rad2deg(tilt), zero], dim=-1))
    b00 = (a[..., 0, :] * m[..., 0, :]).sum(-1)
    b01 = (a[..., 0, :] * m[..., 1, :]).sum(-1)
    psi = torch.atan2(b01, b00)
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def direction_to_euler(directions: Tensor) -> Tensor:
    """Euler angles ``(rot, tilt, 0)`` in degrees whose projection direction ``A^T e_z`` is the
    given direction: ``(D, 3)`` (or ``(..., 3)``) vectors, normalised here, to ``(..., 3)``.

    ``A^T e_z = (sin tilt cos rot, sin tilt sin rot, cos tilt)``; at the poles rot = 0.
    """
    d = _as_float(directions)
    _check_last(d, (3,), "directions")
    x, y, z = d.unbind(-1)
    rot = torch.atan2(y, x)
    tilt = torch.atan2(torch.hypot(x, y), z)
    return torch.stack([torch.rad2deg(rot), torch.rad2deg(tilt), torch.zeros_like(rot)], dim=-1)


def inplane_rotation(psi_rad: Tensor) -> Tensor:
    """``(..., 2, 2)`` matrices ``[[c, s], [-s, c]]`` acting on ``(kx, ky)`` in the same passive
    sense as ``Rz(psi)`` acts on ``(x, y)`` (the upper-left block of ``Rz(psi)``)."""
    p = _as_float(psi_rad)
    c, s = torch.cos(p), torch.sin(p)
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


# --------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------

def _canonical(q: Tensor) -> Tensor:
    """Unit quaternion with ``w >= 0``."""
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_multiply(p: Tensor, q: Tensor) -> Tensor:
    """Hamilton product ``p * q`` of ``(..., 4)`` quaternions ``(w, x, y, z)``; with the matrix
    map of this module, ``quaternion_to_matrix(p * q) = quaternion_to_matrix(p) @ ...(q)``."""
    p, q = _as_float(p), _as_float(q)
    _check_last(p, (4,), "p")
    _check_last(q, (4,), "q")
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        dim=-1,
    )


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """``(..., 4)`` quaternions ``(w, x, y, z)`` (normalised here) to ``(..., 3, 3)`` matrices."""
    q = _as_float(quaternion)
    _check_last(q, (4,), "quaternion")
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    rows = (
        (1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y)),
        (s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x)),
        (s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotation matrices to unit quaternions ``(w, x, y, z)`` with ``w >= 0``
    (Shepperd's method: divide by the largest of the four components)."""
    a = _as_float(matrix)
    _check_last(a, (3, 3), "matrix")
    a00, a01, a02 = a[..., 0, 0], a[..., 0, 1], a[..., 0, 2]
    a10, a11, a12 = a[..., 1, 0], a[..., 1, 1], a[..., 1, 2]
    a20, a21, a22 = a[..., 2, 0], a[..., 2, 1], a[..., 2, 2]
    trace = a00 + a11 + a22
    # 4 * (w^2, x^2, y^2, z^2)
    four_sq = torch.stack(
        [1 + trace, 1 + 2 * a00 - trace, 1 + 2 * a11 - trace, 1 + 2 * a22 - trace], dim=-1
    )
    big = torch.sqrt(four_sq.clamp_min(0.0))  # 2 |component|
    safe = big.clamp_min(torch.finfo(a.dtype).tiny ** 0.5)
    d_w, d_x, d_y, d_z = (2 * safe).unbind(-1)  # 4 |component|
    b_w, b_x, b_y, b_z = (big / 2).unbind(-1)
    candidates = torch.stack(
        [
            torch.stack([b_w, (a21 - a12) / d_w, (a02 - a20) / d_w, (a10 - a01) / d_w], -1),
            torch.stack([(a21 - a12) / d_x, b_x, (a01 + a10) / d_x, (a02 + a20) / d_x], -1),
            torch.stack([(a02 - a20) / d_y, (a01 + a10) / d_y, b_y, (a12 + a21) / d_y], -1),
            torch.stack([(a10 - a01) / d_z, (a02 + a20) / d_z, (a12 + a21) / d_z, b_z], -1),
        ],
        dim=-2,
    )  # (..., 4 cases, 4 components)
    best = four_sq.argmax(dim=-1)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    q = torch.gather(candidates, -2, index).squeeze(-2)
    return _canonical(q)


def euler_to_quaternion(euler_deg: Tensor) -> Tensor:
    """``(..., 3)`` RELION Euler angles in degrees to quaternions ``(w, x, y, z)``, ``w >= 0``.

    Composed directly: passive ``Rz(a)`` / ``Ry(b)`` are active rotations by ``-a`` / ``-b``, so
    ``q = qz(-psi) * qy(-tilt) * qz(-rot)``.
    """
    e = _as_float(euler_deg)
    _check_last(e, (3,), "euler_deg")
    half = -0.5 * torch.deg2rad(e)
    c, s = torch.cos(half), torch.sin(half)
    zero = torch.zeros_like(c[..., 0])
    q_rot = torch.stack([c[..., 0], zero, zero, s[..., 0]], -1)
    q_tilt = torch.stack([c[..., 1], zero, s[..., 1], zero], -1)
    q_psi = torch.stack([c[..., 2], zero, zero, s[..., 2]], -1)
    return _canonical(quaternion_multiply(quaternion_multiply(q_psi, q_tilt), q_rot))


def quaternion_to_euler(quaternion: Tensor) -> Tensor:
    """``(..., 4)`` quaternions ``(w, x, y, z)`` to RELION Euler angles in degrees (as
    ``matrix_to_euler``)."""
    return matrix_to_euler(quaternion_to_matrix(quaternion))


# --------------------------------------------------------------------------------------------
# Rotation vectors (axis * angle), e.g. cryoSPARC poses
# --------------------------------------------------------------------------------------------

def rotvec_to_matrix(rotvec: Tensor) -> Tensor:
    """``(..., 3)`` rotation vectors ``v`` (radians) to ``(..., 3, 3)`` matrices ``exp([v]_x)``
    (a right-handed rotation by ``|v|`` about ``v``, as scipy's ``Rotation.from_rotvec``)."""
    v = _as_float(rotvec)
    _check_last(v, (3,), "rotvec")
    theta = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # sin(theta/2) / theta = sinc(theta / (2 pi)) / 2, well defined at theta = 0
    scale = 0.5 * torch.sinc(theta / (2 * math.pi))
    q = torch.cat([torch.cos(theta / 2), scale * v], dim=-1)
    return quaternion_to_matrix(q)


def matrix_to_rotvec(matrix: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotation matrices to rotation vectors with angle in [0, pi]."""
    q = matrix_to_quaternion(matrix)
    w = q[..., :1]
    xyz = q[..., 1:]
    n = torch.linalg.vector_norm(xyz, dim=-1, keepdim=True)
    angle = 2 * torch.atan2(n, w)
    factor = torch.where(n > 0, angle / torch.where(n > 0, n, torch.ones_like(n)), 2 / w)
    return factor * xyz


def geodesic_angle_rad(a: Tensor, b: Tensor) -> Tensor:
    """``(...)`` angle in radians of the rotation between ``a`` and ``b`` ``(..., 3, 3)``:
    acos((trace(a^T b) - 1) / 2), clamped against rounding."""
    cos = ((a * b.to(a.dtype)).sum(dim=(-2, -1)) - 1.0) / 2.0
    return torch.arccos(cos.clamp(-1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Random rotations
# --------------------------------------------------------------------------------------------

def random_rotations(
    n: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(n, 3, 3)`` Haar-uniform random rotations (normalised Gaussian quaternions).

    Samples are drawn on the generator's device and moved to ``device`` (default: the
    generator's), so a seed gives the same rotations on every device.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    q = torch.randn(int(n), 4, generator=generator, dtype=dtype, device=generator.device)
    # a zero-norm Gaussian 4-vector has probability zero; guard anyway
    q = torch.where(torch.linalg.vector_norm(q, dim=-1, keepdim=True) > 0, q,
                    torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype, device=q.device))
    out = quaternion_to_matrix(q)
    return out if device is None else out.to(device)
