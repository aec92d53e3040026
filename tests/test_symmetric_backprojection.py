"""Back-projection pooled over a point group before the solve (RELION's symmetrised
back-projector): poses restricted to one asymmetric unit, as the exhaustive search finds them,
must reconstruct the symmetric truth as well as poses spread over the whole sphere do."""

from __future__ import annotations

import math

import pytest
import torch

from cryostoch.baselines.reconstruct_map import (
    backprojection_grid_shape,
    gridded_backprojection,
    solve_map,
)
from cryostoch.evaluate.fsc import compute_fsc
from cryostoch.evaluate.transform import soft_sphere_mask
from cryostoch.fourier.grids import half_plane_coefficients
from cryostoch.fourier.spectrum import SpectrumLayout, oversampled_volume_spectrum
from cryostoch.geometry.rotations import matrix_to_euler, random_rotations
from cryostoch.geometry.symmetry import (
    is_signed_permutation_group,
    point_group,
    symmetrize_volume,
    voxel_permutation,
)
from cryostoch.operators.slicing import extract_slices, insert_slices_and_weights
from cryostoch.simulate.phantom import phantom_volume

BOX, RADIUS, OVERSAMPLING = 24, 9, 2


def symmetrized(volume: torch.Tensor, group_name: str) -> torch.Tensor:
    """The group average, by exact voxel permutation where the group permutes the axes."""
    group = point_group(group_name)
    permutation = (voxel_permutation(group, BOX) if is_signed_permutation_group(group)
                   else None)
    return symmetrize_volume(volume, group, permutation=permutation)


def symmetric_truth(group_name: str) -> torch.Tensor:
    """The phantom inside a sphere (nothing on the even box's unpaired outer planes, so that
    the D2 average is exactly symmetric), averaged over the group."""
    inside = soft_sphere_mask(BOX, 0.3 * BOX, edge_px=4.0, dtype=torch.float64)
    return symmetrized(phantom_volume(BOX, 6.0) * inside, group_name)


def in_one_asymmetric_unit(rotations: torch.Tensor, group_name: str) -> torch.Tensor:
    """Each pose (n, 3, 3) replaced by its symmetry mate R g whose viewing direction lies
    highest (largest z of A^T e_z, then smallest azimuth): one representative per class."""
    group = point_group(group_name).matrices
    mates = rotations.unsqueeze(1) @ group.unsqueeze(0)  # (n, G, 3, 3)
    euler = matrix_to_euler(mates.reshape(-1, 3, 3)).view(len(rotations), -1, 3)
    key = euler[..., 1] * 1000 + torch.remainder(euler[..., 0], 360.0)  # tilt, then rot
    return mates[torch.arange(len(rotations)), key.argmin(1)]


def reconstruct(truth: torch.Tensor, rotations: torch.Tensor, symmetry: torch.Tensor | None
                ) -> torch.Tensor:
    """Noise-free central slices of `truth` at `rotations`, back-projected and solved."""
    block, _ = oversampled_volume_spectrum(truth, RADIUS + 1.0, OVERSAMPLING)
    points = half_plane_coefficients(BOX, RADIUS)
    kx, ky = points.kx.double(), points.ky.double()
    slices = extract_slices(block, rotations, kx, ky, OVERSAMPLING) * math.sqrt(BOX)
    layout = SpectrumLayout(BOX, RADIUS + 1, OVERSAMPLING)
    numerator = torch.zeros(backprojection_grid_shape(layout), dtype=torch.complex128)
    weights = torch.zeros(backprojection_grid_shape(layout), dtype=torch.float64)
    weight = points.weights.double().expand_as(slices.real).contiguous()
    insert_slices_and_weights(numerator, weights, slices * weight, weight, rotations, kx, ky,
                              OVERSAMPLING)
    back = gridded_backprojection(numerator, weights, layout, symmetry)
    return solve_map(back, cutoff_px=RADIUS)


def test_pooled_sums_do_not_depend_on_which_symmetry_mate_a_pose_is():
    """For D2 (axis flips: exact on the grid) the pooled reconstruction from poses R and from
    their mates R g is the same to rounding."""
    group = point_group("D2").matrices
    truth = symmetric_truth("D2")
    rotations = random_rotations(60, torch.Generator().manual_seed(0))
    pick = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1))
    a = reconstruct(truth, rotations, group)
    b = reconstruct(truth, rotations @ group[pick], group)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * float(a.abs().max()))


@pytest.mark.parametrize("group_name", ["D2", "D3"])
def test_poses_in_one_asymmetric_unit_recover_the_symmetric_truth(group_name):
    """300 poses in one asymmetric unit: pooled before the solve, the map matches the truth
    (FSC > 0.9 in every shell inside the cutoff; D3 reads its mates by interpolation);
    solving first and averaging the maps after, as refine did, falls short."""
    group = point_group(group_name)
    truth = symmetric_truth(group_name)
    rotations = in_one_asymmetric_unit(
        random_rotations(300, torch.Generator().manual_seed(2)), group_name)
    pooled = reconstruct(truth, rotations, group.matrices)
    averaged = symmetrized(reconstruct(truth, rotations, None), group_name)
    fsc_pooled = compute_fsc(pooled, truth, pixel_size_a=6.0).fsc[1:RADIUS]
    fsc_averaged = compute_fsc(averaged, truth, pixel_size_a=6.0).fsc[1:RADIUS]
    assert float(fsc_pooled.min()) > 0.9, fsc_pooled
    assert float(fsc_averaged.min()) < float(fsc_pooled.min()) - 0.05, (fsc_averaged,
                                                                        fsc_pooled)
