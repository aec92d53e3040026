"""RELION STAR files (via `starfile`): blocks in, RELION 3.1 particle files out.

`read_star` and `split_particle_blocks` read any STAR file; `write_particles_star` writes a
RELION 3.1 particle file. Reading particle files into a ParticleTable is
`cryostoch.io.star_particles`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import starfile
import torch

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path
from cryostoch.io.table_builder import CTF_REQUIRED, OPTICS_FIELDS
from cryostoch.operators.ctf import CtfParameters

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


__all__ = [
    "ANGLE_COLUMNS",
    "CTF_COLUMNS",
    "STAR_CTF",
    "ctf_table",
    "read_star",
    "split_particle_blocks",
    "write_particles_star",
]
