"""RELION Euler angles <-> rotation matrices (private to io; see docs/conventions.md).

RELION's matrix is `A = Rz(psi) @ Ry(tilt) @ Rz(rot)` with passive elementary rotations, i.e.
the transpose of the active intrinsic ZYZ rotation `Rz(rot) Ry(tilt) Rz(psi)`, which is what
scipy's `Rotation.from_euler("ZYZ", ...)` builds. So `A = from_euler("ZYZ", e).as_matrix().T`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


def relion_euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """(n, 3) RELION (rot, tilt, psi) in degrees -> (n, 3, 3) RELION matrices A."""
    euler = np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3)
    return np.swapaxes(Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix(), -1, -2)


def matrix_to_relion_euler(matrices: np.ndarray) -> np.ndarray:
    """(n, 3, 3) RELION matrices A -> (n, 3) (rot, tilt, psi) in degrees, tilt in [0, 180].

    At tilt 0 or 180 only rot + psi (or rot - psi) is defined; psi is then set to 0.
    """
    a = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    return _as_relion_euler(Rotation.from_matrix(np.swapaxes(a, -1, -2)))


def cryosparc_rotvec_to_relion_euler(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC `alignments3D/pose` rotation vectors (radians) -> RELION Euler angles (deg).

    cryoSPARC's pose is the axis-angle vector of the transpose of RELION's matrix:
    `A = expm(hat(rotvec)).T` (the convention used by pyem's csparc2star and cryoDRGN's
    parse_pose_csparc), so the active intrinsic ZYZ angles of `expm(hat(rotvec))` are RELION's.
    """
    r = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    return _as_relion_euler(Rotation.from_rotvec(r))


def _as_relion_euler(rotation: Rotation) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal lock: psi set to 0
        euler = rotation.as_euler("ZYZ", degrees=True)
    return np.asarray(euler, dtype=np.float64).reshape(-1, 3)
