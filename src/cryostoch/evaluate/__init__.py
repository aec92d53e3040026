"""Evaluating maps: Fourier shell correlation, rigid transforms (rotation, shift, hand) and the
alignment of one map onto another."""

from cryostoch.evaluate.align import Alignment, align_maps, apply_alignment
from cryostoch.evaluate.fsc import (
    FscReport,
    FscResult,
    compute_fsc,
    fourier_shell_correlation,
    fsc_report,
    half_space_weights,
    plot_fsc,
    shell_counts,
)
from cryostoch.evaluate.transform import (
    centred_coordinates,
    mirror_volume,
    rotate_volume,
    sampling_grid,
    soft_sphere_mask,
)

__all__ = [
    "Alignment",
    "FscReport",
    "FscResult",
    "align_maps",
    "apply_alignment",
    "centred_coordinates",
    "compute_fsc",
    "fourier_shell_correlation",
    "fsc_report",
    "half_space_weights",
    "mirror_volume",
    "plot_fsc",
    "rotate_volume",
    "sampling_grid",
    "shell_counts",
    "soft_sphere_mask",
]
