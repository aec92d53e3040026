"""Gridded back-projection against analytic slices: the real-space envelope of the trilinear
kernel (`correct_gridding`) and how much of the inserted weight the integer-frequency read
keeps. The slices are the closed-form Fourier transform of Gaussian blobs, not the model's
own forward operator."""

from __future__ import annotations

import math

import pytest
import torch

from cryostoch.baselines.reconstruct_map import (
    backprojection_grid_shape,
    correct_gridding,
    gridded_backprojection,
    solve_map,
)
from cryostoch.fourier.grids import half_plane_coefficients
from cryostoch.fourier.spectrum import SpectrumLayout
from cryostoch.geometry.rotations import random_rotations
from cryostoch.operators.slicing import insert_slices_and_weights, slice_points_3d

BOX, RADIUS, SIGMA_PX = 32, 14, 1.6
BLOBS = ((0, 0, 0), (9, 0, 0), (0, -7, 7))  # (dx, dy, dz) px from the box centre N // 2


def blob_spectrum(points: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 3-D DFT (as `rfft3c`) of unit-height Gaussian blobs at BLOBS, in
    closed form at frequencies `points` (..., 3) (x, y, z; cycles per box)."""
    amplitude = ((2 * math.pi * SIGMA_PX**2) ** 1.5 * BOX**-1.5
                 * torch.exp(-2 * math.pi**2 * SIGMA_PX**2 * (points**2).sum(-1) / BOX**2))
    total = torch.zeros(points.shape[:-1], dtype=torch.complex128)
    for offset in BLOBS:
        phase = -2 * math.pi * (points * torch.tensor(offset, dtype=torch.float64)).sum(-1) / BOX
        total += amplitude * torch.polar(torch.ones_like(phase), phase)
    return total


def back_project(oversampling: int):
    """Noise-free central slices of the blobs at 4,000 random poses, inserted on a grid
    `oversampling` times finer than the DFT's; (BackProjection, total inserted weight)."""
    rotations = random_rotations(4000, torch.Generator().manual_seed(0))
    points = half_plane_coefficients(BOX, RADIUS)
    kx, ky = points.kx.double(), points.ky.double()
    # a 2-D image's DFT is the 3-D one's central slice times sqrt(N) (orthonormal transforms)
    slices = blob_spectrum(slice_points_3d(rotations, kx, ky)) * math.sqrt(BOX)
    weight = points.weights.double().expand_as(slices.real).contiguous()
    layout = SpectrumLayout(BOX, RADIUS + 1, oversampling)
    numerator = torch.zeros(backprojection_grid_shape(layout), dtype=torch.complex128)
    weights = torch.zeros(backprojection_grid_shape(layout), dtype=torch.float64)
    insert_slices_and_weights(numerator, weights, slices * weight, weight, rotations, kx, ky,
                              oversampling)
    return gridded_backprojection(numerator, weights, layout), float(weight.sum())


def value_at(volume: torch.Tensor, offset: tuple[int, int, int]) -> float:
    c = BOX // 2
    return float(volume[c + offset[2], c + offset[1], c + offset[0]])


@pytest.mark.parametrize("oversampling", [1, 2])
def test_gridding_envelope_matches_the_kernels_transform_and_is_divided_out(oversampling):
    back, _ = back_project(oversampling)
    raw = solve_map(back, cutoff_px=RADIUS)
    corrected = correct_gridding(raw, oversampling)
    centre_raw, centre = value_at(raw, BLOBS[0]), value_at(corrected, BLOBS[0])
    assert centre == pytest.approx(1.0, abs=0.03)
    for offset in BLOBS[1:]:
        envelope = math.prod(
            (math.sin(math.pi * x / (BOX * oversampling)) / (math.pi * x / (BOX * oversampling))
             if x else 1.0) ** 2 for x in offset)
        assert envelope < 0.97  # off-centre enough to tell the two apart
        assert value_at(raw, offset) / centre_raw == pytest.approx(envelope, abs=0.03)
        assert value_at(corrected, offset) / centre == pytest.approx(1.0, abs=0.02)


def test_reading_the_dft_grid_keeps_all_inserted_weight_a_finer_grid_an_eighth():
    """Why refine back-projects on the DFT's own grid: the ratio is read at the integer
    frequencies, which on a 2x grid receive only about 1/8 of each sample's trilinear weight."""
    back, inserted = back_project(1)
    kept = float(back.denominator.sum()) / BOX / inserted
    # slightly over 1: the kx = 0 plane is folded Hermitian (its samples count twice)
    assert 1.0 <= kept < 1.1
    back2, inserted2 = back_project(2)
    assert float(back2.denominator.sum()) / BOX / inserted2 == pytest.approx(1 / 8, abs=0.03)


@pytest.mark.parametrize("oversampling", [1, 2])
def test_correct_gridding_is_floored_outside_the_inscribed_sphere(oversampling):
    """The solvent in the corners is amplified no more than the centres of the faces are:
    1 / sinc^2(1 / (2 oversampling))."""
    corrected = correct_gridding(torch.ones(BOX, BOX, BOX, dtype=torch.float64), oversampling)
    x = math.pi / (2 * oversampling)
    face = (math.sin(x) / x) ** 2
    c = BOX // 2
    assert float(corrected[c, c, 0]) == pytest.approx(1 / face)  # x = -N/2: a face's centre
    assert float(corrected.max()) == pytest.approx(1 / face)
    assert float(corrected[0, 0, 0]) == pytest.approx(1 / face)  # a corner, floored
    assert float(corrected[c, c, c]) == 1.0


def test_correct_gridding_rejects_non_cubic_maps_and_bad_oversampling():
    with pytest.raises(ValueError, match="oversampling"):
        correct_gridding(torch.zeros(8, 8, 8), 0)
    with pytest.raises(ValueError, match="N, N, N"):
        correct_gridding(torch.zeros(8, 8, 4), 1)
