"""The map-following solvent mask against analytic shapes."""

from __future__ import annotations

import math

import pytest
import torch

from cryostoch.model.solvent import dynamic_mask


def radius_grid(n: int) -> torch.Tensor:
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.sqrt(x * x + y * y + z * z)


@pytest.mark.parametrize("threshold", [0.15, 0.3])
def test_mask_of_a_gaussian_follows_its_threshold_contour(threshold):
    n, sigma, dilate, edge = 48, 4.0, 3.0, 4.0
    r = radius_grid(n)
    volume = torch.exp(-(r**2) / (2 * sigma**2))
    sphere = torch.ones(n, n, n, dtype=torch.float64)
    mask = dynamic_mask(volume, sphere, threshold_fraction=threshold, dilate_px=dilate,
                        edge_px=edge)
    contour = sigma * math.sqrt(2 * math.log(1 / threshold))  # where the Gaussian = threshold
    assert bool((mask[r <= contour + dilate - 1] == 1).all())
    assert bool((mask[r >= contour + dilate + edge + 1] == 0).all())
    ramp = mask[(r > contour + dilate + 1) & (r < contour + dilate + edge - 1)]
    assert bool(((ramp > 0) & (ramp < 1)).all())


def test_mask_ignores_unconnected_specks_and_stays_inside_the_sphere():
    n = 40
    r = radius_grid(n)
    volume = torch.exp(-(r**2) / 18.0)
    volume[2, 2, 2] = 0.9  # a speck far from the molecule
    sphere = (r <= 15).double()
    mask = dynamic_mask(volume, sphere, threshold_fraction=0.15)
    assert float(mask[2, 2, 2]) == 0
    assert bool((mask[r > 15] == 0).all())
    assert float(mask[n // 2, n // 2, n // 2]) == 1
    # no positive density: the sphere itself
    assert torch.equal(dynamic_mask(-volume, sphere), sphere)
