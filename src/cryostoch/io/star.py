"""RELION STAR files (via `starfile`): blocks in, RELION 3.1 particle files out.

`read_star` and `split_particle_blocks` read any STAR file; `read_class_assignments` reads a
classification's particle classes; `relion_tables` + `write_particles_star` export a
ParticleDataset (with new poses, say) as a RELION 3.1 particle file. Reading particle files
into a ParticleTable is `cryostoch.io.star_particles`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import starfile
import torch

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path
from cryostoch.io.records import Poses
from cryostoch.io.table_builder import CTF_REQUIRED, OPTICS_FIELDS
from cryostoch.operators.ctf import CtfParameters

if TYPE_CHECKING:  # dataset.py imports this module
    from cryostoch.io.dataset import ParticleDataset

# RELION's column for each CtfParameters field (same units).
STAR_CTF = {
    "defocus_u_a": "rlnDefocusU",
    "defocus_v_a": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "voltage_kv": "rlnVoltage",
    "spherical_aberration_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift_deg": "rlnPhaseShift",
    "bfactor_a2": "rlnCtfBfactor",
    "scale": "rlnCtfScalefactor",
}
CTF_COLUMNS = tuple(STAR_CTF[name] for name in CTF_REQUIRED)
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def read_star(path: str | os.PathLike[str]) -> dict[str, pd.DataFrame | dict]:
    """All data blocks of a STAR file by name (without `data_`); InputError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such STAR file")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # noqa: BLE001 - starfile raises many kinds; report any as input
        raise InputError(path, f"not a readable STAR file ({type(err).__name__}: {err})") from None
    if not blocks:
        raise InputError(path, "not a STAR file: no data blocks found")
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            twice = sorted(set(block.columns[block.columns.duplicated()]))
            raise InputError(path, f"column {', '.join(map(str, twice))} appears more than once "
                             f"in data_{name}")
    return dict(blocks)


def split_particle_blocks(
    path: Path, blocks: dict[str, pd.DataFrame | dict]
) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """(optics table or None, particle table) of a RELION 3.0 or 3.1+ STAR file."""
    loops = {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}
    optics = loops.pop("optics", None)
    if "particles" in loops:
        return optics, loops["particles"]
    if len(loops) == 1:
        return optics, next(iter(loops.values()))
    for column in ("rlnImageName", "rlnDefocusU"):
        with_column = [df for df in loops.values() if column in df.columns]
        if with_column:
            return optics, with_column[0]
    names = ", ".join(f"data_{n}" for n in blocks) or "none"
    raise InputError(path, f"no particle table found (blocks: {names})")

def write_particles_star(
    path: str | os.PathLike[str], optics: pd.DataFrame, particles: pd.DataFrame
) -> None:
    """Write a RELION 3.1 particle file (`data_optics` + `data_particles`), atomically.

    Column names are RELION labels without the leading underscore (`rlnDefocusU`), as
    `ParticleDataset.metadata` and `optics_table` hold them.
    """
    if not isinstance(optics, pd.DataFrame) or not isinstance(particles, pd.DataFrame):
        raise TypeError("optics and particles must be pandas DataFrames")
    if len(optics) == 0:
        raise ValueError("a RELION 3.1 STAR file needs at least one optics group")
    if "rlnOpticsGroup" not in optics.columns or (
        len(optics) > 1 and "rlnOpticsGroup" not in particles.columns
    ):
        raise ValueError("optics needs rlnOpticsGroup (and particles too with several groups)")
    for frame in (optics, particles):
        bad = [c for c in frame.columns if not str(c).startswith("rln")]
        if bad:
            raise ValueError(f"STAR column names must be RELION labels (rln...): {bad}")
    with atomic_path(path) as tmp:
        starfile.write(
            {
                "optics": optics.reset_index(drop=True),
                "particles": particles.reset_index(drop=True),
            },
            tmp,
            float_format="%.10g",
        )


def ctf_table(ctf: CtfParameters) -> pd.DataFrame:
    """The CTF columns RELION stores per particle, from CtfParameters."""
    per_particle = [name for name in STAR_CTF if name not in OPTICS_FIELDS]
    return pd.DataFrame({
        STAR_CTF[name]: getattr(ctf, name).detach().cpu().to(torch.float64).numpy()
        for name in per_particle
    })


# RELION 3.0 per-particle columns that RELION 3.1 keeps in the optics table.
_PER_PARTICLE_OPTICS = (
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnPixelSize",
    "rlnImagePixelSize",
    "rlnImageSize",
)


def relion_tables(
    dataset: ParticleDataset, poses: Poses | None = None, absolute_paths: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) DataFrames of a dataset for `write_particles_star` (RELION 3.1).

    STAR input keeps its original columns (RELION 3.0 per-particle optics columns move
    to the optics table); .cs and bare-stack input get rlnImageName and the CTF columns.
    `poses` (default: the dataset's own; (n,) for the n particles of the dataset) are written
    as rlnAngleRot/Tilt/Psi and rlnOriginXAngst/YAngst = -shift * pixel size. With
    `absolute_paths`, rlnImageName names the stacks by their resolved absolute paths, so the
    file works from any folder.
    """
    n = len(dataset)
    if dataset.kind == "star":
        particles = dataset.metadata.copy()
        if dataset.optics_table is None:
            particles = particles.drop(columns=[c for c in _PER_PARTICLE_OPTICS if c in particles])
    else:
        particles = pd.DataFrame(index=pd.RangeIndex(n))
        if dataset.ctf is not None:
            particles = pd.concat([particles, ctf_table(dataset.ctf)], axis=1)
    particles["rlnOpticsGroup"] = dataset.optics_group
    stack_id = dataset.stack_id
    if dataset.stacks and (stack_id >= 0).all():
        names = []
        for sid, slot in zip(stack_id.tolist(), dataset.stack_slot.tolist(), strict=True):
            ref = dataset.stacks[sid]
            where = ref.path.resolve() if (absolute_paths and ref.path) else ref.written
            names.append(f"{slot + 1:06d}@{where}")
        particles["rlnImageName"] = names
    poses = dataset.poses if poses is None else poses
    pixel = dataset.pixel_size_a
    if poses is not None:
        if len(poses) != n:
            raise ValueError(f"{len(poses)} poses for {n} particles")
        euler = poses.euler_deg.detach().cpu().to(torch.float64).numpy()
        shifts = poses.shifts_px.detach().cpu().to(torch.float64).numpy()
        particles = particles.drop(
            columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in particles]
        )
        for j, name in enumerate(ANGLE_COLUMNS):
            particles[name] = euler[:, j]
        # the model's shift t puts the centre at N // 2 + t; RELION's origin is -t
        particles["rlnOriginXAngst"] = -shifts[:, 0] * pixel
        particles["rlnOriginYAngst"] = -shifts[:, 1] * pixel
    for axis in ("X", "Y"):  # RELION 3.0 origins in pixels -> 3.1 in Angstrom
        if f"rlnOrigin{axis}" in particles:
            pixels = pd.to_numeric(particles.pop(f"rlnOrigin{axis}"), errors="coerce")
            particles[f"rlnOrigin{axis}Angst"] = pixels * pixel
    return _optics_dataframe(dataset), particles


def _optics_dataframe(dataset: ParticleDataset) -> pd.DataFrame:
    """The dataset's data_optics, made from its optics groups where the file had none."""
    if dataset.optics_table is not None:
        return dataset.optics_table.copy()
    rows = []
    for g in dataset.optics_groups:
        row = {"rlnOpticsGroupName": g.name, "rlnOpticsGroup": g.number}
        for name, value in (
            ("rlnVoltage", g.voltage_kv),
            ("rlnSphericalAberration", g.spherical_aberration_mm),
            ("rlnAmplitudeContrast", g.amplitude_contrast),
            ("rlnImagePixelSize", g.pixel_size_a),
        ):
            if np.isfinite(value):
                row[name] = value
        if g.box_size > 0:
            row["rlnImageSize"] = g.box_size
        row["rlnImageDimensionality"] = 2
        rows.append(row)
    return pd.DataFrame(rows)


def read_class_assignments(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image_names (n,) str, class_numbers (n,) int64) of a RELION classification STAR file
    (e.g. Class2D's `run_itNNN_data.star`): rlnImageName and rlnClassNumber of each row of
    its particle table (`data_particles`, else the first block)."""
    blocks = read_star(path)
    loops = {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}
    table = loops.get("particles", next(iter(loops.values()), None))
    if table is None or not {"rlnImageName", "rlnClassNumber"} <= set(table.columns):
        raise InputError(path, "not a classification STAR file: a particle table needs "
                         "rlnImageName and rlnClassNumber columns")
    classes = pd.to_numeric(table["rlnClassNumber"], errors="coerce").to_numpy(dtype=np.float64)
    if not (np.isfinite(classes) & (classes == np.round(classes))).all():
        raise InputError(path, "rlnClassNumber must be whole numbers")
    return table["rlnImageName"].astype(str).to_numpy(dtype=str), classes.astype(np.int64)


__all__ = [
    "ANGLE_COLUMNS",
    "CTF_COLUMNS",
    "STAR_CTF",
    "ctf_table",
    "read_class_assignments",
    "read_star",
    "relion_tables",
    "split_particle_blocks",
    "write_particles_star",
]
