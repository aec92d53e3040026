"""Defaults chosen from the data: cutoff from the particle diameter, shift range from the box,
length from the number of particles; every explicit option wins over its default."""

from __future__ import annotations

import pytest

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.prepare import working_geometry
from cryostoch.engine.schedule import run_epochs
from cryostoch.errors import InputError


def config(**kw) -> ReconstructionConfig:
    return ReconstructionConfig(particles="p.star", out_dir="o", **kw)


@pytest.mark.parametrize("box, pixel_a", [(64, 3.54), (128, 1.77), (256, 1.1)])
def test_cutoff_is_a_fifth_of_the_diameter_whatever_the_sampling(box, pixel_a):
    geometry = working_geometry(config(), box, pixel_a)
    diameter_a = 0.8 * box * pixel_a
    assert geometry.cutoff_resolution_a == pytest.approx(diameter_a / 5)
    # the same number of Fourier pixels (so the same search cost) at every sampling
    assert geometry.cutoff_radius_px == pytest.approx(6.25)
    assert geometry.shift_range_a == pytest.approx(0.08 * box * pixel_a)
    assert len(geometry.chosen) == 3


def test_a_given_diameter_sets_the_cutoff_and_explicit_options_win():
    geometry = working_geometry(config(particle_diameter_a=100.0), 64, 3.54)
    assert geometry.cutoff_resolution_a == pytest.approx(20.0)
    assert geometry.particle_radius_px == pytest.approx(50 / 3.54)
    explicit = working_geometry(config(max_freq=0.1, shift_range_a=0.0), 64, 3.54)
    assert explicit.cutoff_radius_px == pytest.approx(3.2)
    assert explicit.shift_range_a == 0 and len(explicit.chosen) == 1  # the diameter only
    given = working_geometry(config(resolution_a=40.0, max_freq=0.5), 64, 3.54)
    assert given.cutoff_resolution_a == pytest.approx(40.0)


def test_a_small_box_keeps_the_cutoff_inside_the_box():
    # a small diameter would put the cutoff (20 A / 5 = 4 A) past box/2 - 3
    geometry = working_geometry(config(particle_diameter_a=20.0), 32, 8.0)
    assert geometry.cutoff_radius_px == pytest.approx(13.0)
    with pytest.raises(InputError, match="resolution-a"):
        working_geometry(config(resolution_a=10.0), 32, 8.0)


def test_epochs_give_at_least_the_minimum_number_of_steps():
    assert run_epochs(config(), 2274) == pytest.approx(150 * 100 / 2274)
    assert run_epochs(config(), 100_000) == 1.0
    assert run_epochs(config(optimizer="hf"), 15_000) == pytest.approx(3.0)  # batches of 300
    assert run_epochs(config(epochs=0.5), 2274) == 0.5
