"""Forward-model operators: slice extraction/insertion, CTF, shifts, in-plane resampling."""

from cryostoch.operators.ctf import CtfParameters, electron_wavelength_a, evaluate_ctf
from cryostoch.operators.inplane import (
    cubic_interpolation_matrix,
    hermitian_extend,
    inplane_sample_points,
    sample_blocks,
)
from cryostoch.operators.shift import shift_images, shift_phases
from cryostoch.operators.slicing import (
    extract_slices,
    extract_slices_sampled,
    hermitian_fold_half_plane,
    insert_slice_weights,
    insert_slices,
    insert_slices_and_weights,
    slice_points_3d,
    trilinear_stencil,
)

__all__ = [
    "CtfParameters",
    "cubic_interpolation_matrix",
    "electron_wavelength_a",
    "evaluate_ctf",
    "extract_slices",
    "extract_slices_sampled",
    "hermitian_extend",
    "hermitian_fold_half_plane",
    "inplane_sample_points",
    "insert_slice_weights",
    "insert_slices_and_weights",
    "insert_slices",
    "sample_blocks",
    "shift_images",
    "shift_phases",
    "slice_points_3d",
    "trilinear_stencil",
]
