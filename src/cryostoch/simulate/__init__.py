"""Simulated data: ground-truth densities (built-in phantom, MRC maps, atomic models via gemmi),
particle images by the likelihood's own forward model, and the paper's random initial density.

- `phantom_volume`: the built-in asymmetric molecule (see `cryostoch.simulate.phantom`).
- `load_source_volume`: 'phantom', an MRC map or a PDB/mmCIF model on a given box and pixel.
- `ProjectionModel`, `draw_particle_parameters`, `particle_noise`: the forward model and the
  random draws (see `cryostoch.simulate.particles` for the SNR definition).
- `SimulationConfig`, `simulate_dataset`: a whole data set on disk (`cryostoch simulate`).
- `cryostoch.simulate.noise` / `cryostoch.simulate.hazards`: coloured noise, junk images and
  per-particle contrast (real-data hazards).
- `random_spheres_volume`: the paper's random initial density (`cryostoch random-init`).
"""

from cryostoch.simulate.atomic import atomic_model_volume, read_atomic_model
from cryostoch.simulate.ctf import CtfSampler, CtfTable, DefaultCtf, Optics
from cryostoch.simulate.init import random_spheres_volume
from cryostoch.simulate.particles import (
    ParticleParameters,
    ProjectionModel,
    draw_particle_parameters,
    mean_signal_variance,
    noise_seeds,
    particle_noise,
)
from cryostoch.simulate.phantom import phantom_radius_a, phantom_volume
from cryostoch.simulate.run import SimulationConfig, SimulationResult, simulate_dataset
from cryostoch.simulate.volumes import SourceVolume, load_source_volume

__all__ = [
    "CtfSampler",
    "CtfTable",
    "DefaultCtf",
    "Optics",
    "ParticleParameters",
    "ProjectionModel",
    "SimulationConfig",
    "SimulationResult",
    "SourceVolume",
    "atomic_model_volume",
    "draw_particle_parameters",
    "load_source_volume",
    "mean_signal_variance",
    "noise_seeds",
    "particle_noise",
    "phantom_radius_a",
    "phantom_volume",
    "random_spheres_volume",
    "read_atomic_model",
    "simulate_dataset",
]
