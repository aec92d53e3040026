"""Rotations (RELION Euler angles, matrices, quaternions, rotation vectors) and quadrature
over orientations (Lebedev directions x in-plane angles) and shifts, point-group symmetry."""

from cryostoch.geometry.quadrature import (
    DIRECTION_DENSITY_FACTOR,
    OrientationQuadrature,
    ShiftQuadrature,
    angular_step_rad,
    default_shift_step_px,
    lebedev_sizes,
    max_radius_px,
    orientation_quadrature,
    shift_quadrature,
    sphere_rule,
)
from cryostoch.geometry.rotations import (
    direction_to_euler,
    euler_to_matrix,
    euler_to_quaternion,
    geodesic_angle_rad,
    inplane_rotation,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_rotvec,
    quaternion_multiply,
    quaternion_to_euler,
    quaternion_to_matrix,
    random_rotations,
    rotvec_to_matrix,
)
from cryostoch.geometry.symmetry import (
    PointGroup,
    asymmetric_unit_directions,
    point_group,
    restrict_orientation_quadrature,
    symmetrize_volume,
)

__all__ = [
    "DIRECTION_DENSITY_FACTOR", "OrientationQuadrature", "PointGroup", "ShiftQuadrature",
    "angular_step_rad", "asymmetric_unit_directions", "point_group",
    "restrict_orientation_quadrature", "symmetrize_volume",
    "default_shift_step_px", "direction_to_euler", "euler_to_matrix", "euler_to_quaternion",
    "inplane_rotation", "lebedev_sizes", "matrix_to_euler", "matrix_to_quaternion",
    "matrix_to_rotvec", "max_radius_px", "orientation_quadrature", "quaternion_multiply",
    "quaternion_to_euler", "quaternion_to_matrix", "random_rotations", "rotvec_to_matrix",
    "geodesic_angle_rad",
    "shift_quadrature", "sphere_rule",
]
