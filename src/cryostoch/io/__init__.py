"""File formats: MRC maps and stacks, RELION STAR, cryoSPARC .cs; one lazy ParticleDataset.

Bad input raises `cryostoch.errors.InputError(path, problem)` with a one-line problem.
"""

from cryostoch.io.cryosparc import read_cs, read_particle_cs
from cryostoch.io.dataset import (
    ParticleDataset,
    open_particles,
    read_particle_table,
)
from cryostoch.io.mrc import (
    MrcHeader,
    MrcStack,
    StackWriter,
    open_stack,
    read_header,
    read_map,
    write_map,
)
from cryostoch.io.records import OpticsGroup, ParticleTable, Poses, StackRef
from cryostoch.io.star import (
    ctf_table,
    read_class_assignments,
    read_star,
    relion_tables,
    write_particles_star,
)
from cryostoch.io.star_particles import read_particle_star

__all__ = [
    "MrcHeader",
    "MrcStack",
    "OpticsGroup",
    "ParticleDataset",
    "ParticleTable",
    "Poses",
    "StackRef",
    "StackWriter",
    "ctf_table",
    "open_particles",
    "open_stack",
    "read_class_assignments",
    "read_cs",
    "read_header",
    "read_map",
    "read_particle_cs",
    "read_particle_star",
    "read_particle_table",
    "read_star",
    "relion_tables",
    "write_map",
    "write_particles_star",
]
