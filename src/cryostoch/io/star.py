"""RELION STAR files (via `starfile`): particle tables in, RELION 3.1 particle files out.

Reads RELION 3.0 files (one loop block, e.g. `data_` or `data_images`, CTF and pixel size
per particle) and RELION 3.1 / 4 / 5 files (`data_optics` + `data_particles`). Image names are
`index@stack` with a 1-based index; stack paths are relative to the STAR file's folder or
to a project folder (RELION's: an ancestor of the STAR file) and are searched in that order
unless `project_root` is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path, check_finite, check_positive
from cryostoch.io.records import (
    OpticsGroup,
    ParticleTable,
    as_tensor64,
    check_stack_boxes,
    locate_images,
    pixel_and_box_from_stacks,
    poses_from_arrays,
)
from cryostoch.operators.ctf import CtfParameters

CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
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


class _Columns:
    """Per-particle look-up of a column in the particle table, else in the optics table."""

    def __init__(
        self,
        path: Path,
        particles: pd.DataFrame,
        optics: pd.DataFrame | None,
        optics_row: np.ndarray | None,
    ):
        self.path = path
        self.particles = particles
        self.optics = optics
        self.optics_row = optics_row

    def has(self, name: str) -> bool:
        return name in self.particles.columns or (
            self.optics is not None and name in self.optics.columns
        )

    def values(self, name: str) -> np.ndarray | None:
        if name in self.particles.columns:
            series = self.particles[name]
        elif self.optics is not None and name in self.optics.columns:
            series = self.optics[name].iloc[self.optics_row]
        else:
            return None
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        check_finite(self.path, name, values)
        return values


def _optics_rows(path: Path, particles: pd.DataFrame, optics: pd.DataFrame) -> np.ndarray:
    """Row of the optics table of every particle."""
    if "rlnOpticsGroup" in optics.columns:
        numbers = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy()
    else:
        numbers = np.arange(1, len(optics) + 1)
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(
                path,
                f"the particles have no rlnOpticsGroup column but data_optics has "
                f"{len(optics)} groups",
            )
        return np.zeros(len(particles), dtype=np.int64)
    wanted = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce")
    finite = np.isfinite(numbers)
    lookup = pd.Series(np.flatnonzero(finite), index=numbers[finite].astype(np.int64))
    lookup = lookup[~lookup.index.duplicated()]
    rows = wanted.map(lookup).fillna(-1).to_numpy(dtype=np.int64)
    if (rows < 0).any():
        first = int(np.flatnonzero(rows < 0)[0])
        raise InputError(
            path,
            f"particle {first + 1} has rlnOpticsGroup {particles['rlnOpticsGroup'].iloc[first]} "
            f"which is not in data_optics (groups: {', '.join(str(int(x)) for x in numbers)})",
        )
    return rows.astype(np.int64)


def _parse_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """rlnImageName `index@stack` -> (0-based index per particle, stack path per particle)."""
    names = names.astype(str).str.strip()
    has_at = names.str.contains("@", regex=False)
    split = names.str.split("@", n=1, expand=True)
    if split.shape[1] == 1:
        split[1] = None
    index_text = split[0].where(has_at, "1")
    stack = split[1].where(has_at, names)
    index = pd.to_numeric(index_text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index)) | (stack.str.len() == 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            path,
            f"rlnImageName {names.iloc[first]!r} of particle {first + 1} is not "
            "'index@stack' with a 1-based index",
        )
    return index.astype(np.int64) - 1, stack


def read_particle_star(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """Read a RELION particle STAR file into a ParticleTable (see `open_particles`)."""
    path = Path(path)
    blocks = read_star(path)
    optics, particles = split_particle_blocks(path, blocks)
    particles = particles.reset_index(drop=True)
    if optics is not None:
        optics = optics.reset_index(drop=True)
        if len(optics) == 0:
            optics = None
    n = len(particles)
    if n == 0:
        raise InputError(path, "the particle table is empty")
    optics_row = _optics_rows(path, particles, optics) if optics is not None else None
    cols = _Columns(path, particles, optics, optics_row)
    notes: list[str] = []

    missing = [c for c in CTF_COLUMNS if not cols.has(c)]
    if missing:
        raise InputError(
            path,
            f"missing CTF columns: {', '.join(missing)} (a particle STAR file needs defocus "
            "U, V and angle, voltage, spherical aberration and amplitude contrast)",
        )

    # Images.
    references = (_parse_image_names(path, particles["rlnImageName"])
                  if "rlnImageName" in particles.columns else None)
    slot, stack_id, stacks = locate_images(path, n, references, project_root, check_images,
                                           "rlnImageName", "no rlnImageName column")
    header_pixel, header_box = pixel_and_box_from_stacks(stacks, stack_id)

    # Pixel size: optics/particle columns first, then the stack headers.
    pixel = np.full(n, np.nan)
    for name in ("rlnImagePixelSize", "rlnPixelSize"):
        if cols.has(name) and np.isnan(pixel).any():
            values = cols.values(name)
            check_positive(path, name, values)
            pixel = np.where(np.isnan(pixel), values, pixel)
            notes.append(f"pixel size from {name}")
    if cols.has("rlnDetectorPixelSize") and cols.has("rlnMagnification") and np.isnan(pixel).any():
        detector = cols.values("rlnDetectorPixelSize")
        magnification = cols.values("rlnMagnification")
        check_positive(path, "rlnDetectorPixelSize", detector)
        check_positive(path, "rlnMagnification", magnification)
        pixel = np.where(np.isnan(pixel), detector * 1e4 / magnification, pixel)
        notes.append("pixel size from rlnDetectorPixelSize * 1e4 / rlnMagnification")
    if np.isnan(pixel).any() and not np.isnan(header_pixel).all():
        pixel = np.where(np.isnan(pixel), header_pixel, pixel)
        notes.append("pixel size from the MRC header of the stacks")
    if np.isnan(pixel).any() and check_images:
        first = int(np.flatnonzero(np.isnan(pixel))[0])
        raise InputError(
            path,
            f"no pixel size for particle {first + 1}: no rlnImagePixelSize, rlnPixelSize or "
            "rlnDetectorPixelSize + rlnMagnification, and its stack header sets none",
        )

    # Box size: rlnImageSize, else the stack headers.
    if cols.has("rlnImageSize"):
        box_values = cols.values("rlnImageSize")
        check_positive(path, "rlnImageSize", box_values)
        box = box_values.astype(np.int64)
        check_stack_boxes(path, stacks, stack_id, box)
    else:
        check_stack_boxes(path, stacks, stack_id, np.zeros(n, dtype=np.int64))
        box = np.where(header_box > 0, header_box, 0).astype(np.int64)

    # CTF.
    ctf_values = {name: cols.values(name) for name in CTF_COLUMNS}
    check_positive(path, "rlnVoltage", ctf_values["rlnVoltage"])
    q0 = ctf_values["rlnAmplitudeContrast"]
    if ((q0 < 0) | (q0 >= 1)).any():
        first = int(np.flatnonzero((q0 < 0) | (q0 >= 1))[0])
        raise InputError(
            path,
            f"rlnAmplitudeContrast must be in [0, 1), got {q0[first]:g} (particle {first + 1})",
        )
    optional = {
        "rlnPhaseShift": 0.0,
        "rlnCtfBfactor": 0.0,
        "rlnCtfScalefactor": 1.0,
    }
    extra = {}
    for name, default in optional.items():
        values = cols.values(name)
        extra[name] = np.full(n, default) if values is None else values
    ctf = CtfParameters(
        defocus_u_a=as_tensor64(ctf_values["rlnDefocusU"]),
        defocus_v_a=as_tensor64(ctf_values["rlnDefocusV"]),
        defocus_angle_deg=as_tensor64(ctf_values["rlnDefocusAngle"]),
        voltage_kv=as_tensor64(ctf_values["rlnVoltage"]),
        spherical_aberration_mm=as_tensor64(ctf_values["rlnSphericalAberration"]),
        amplitude_contrast=as_tensor64(q0),
        phase_shift_deg=as_tensor64(extra["rlnPhaseShift"]),
        bfactor_a2=as_tensor64(extra["rlnCtfBfactor"]),
        scale=as_tensor64(extra["rlnCtfScalefactor"]),
    )

    # Poses: only with all three angles; origins in Angstrom (3.1+) or pixels (3.0).
    poses = None
    if all(c in particles.columns for c in ANGLE_COLUMNS):
        euler = np.stack([cols.values(c) for c in ANGLE_COLUMNS], axis=1)
        if "rlnOriginXAngst" in particles.columns and "rlnOriginYAngst" in particles.columns:
            origin = (
                np.stack([cols.values("rlnOriginXAngst"), cols.values("rlnOriginYAngst")], axis=1)
                / pixel[:, None]
            )
        elif "rlnOriginX" in particles.columns and "rlnOriginY" in particles.columns:
            origin = np.stack([cols.values("rlnOriginX"), cols.values("rlnOriginY")], axis=1)
        else:
            origin = np.zeros((n, 2))
        poses = poses_from_arrays(euler, -origin)

    # Optics groups.
    if optics is not None:
        groups, group_of = _groups_from_optics(optics, optics_row, ctf_values, pixel, box)
    else:
        groups, group_of = _groups_from_values(ctf_values, pixel, box)

    return ParticleTable(
        source_path=path,
        kind="star",
        metadata=particles,
        optics_table=optics,
        optics_groups=groups,
        optics_group=group_of,
        ctf=ctf,
        poses=poses,
        pixel_size_a=pixel,
        box_size=box,
        stacks=stacks,
        stack_id=stack_id,
        stack_slot=slot,
        notes=notes,
    )


def _groups_from_optics(
    optics: pd.DataFrame,
    optics_row: np.ndarray,
    ctf_values: dict[str, np.ndarray],
    pixel: np.ndarray,
    box: np.ndarray,
) -> tuple[list[OpticsGroup], np.ndarray]:
    """One OpticsGroup per row of data_optics; values of its first particle where the
    optics table lacks a column (or the group has no particles)."""
    numbers = (
        pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy().astype(np.int64)
        if "rlnOpticsGroup" in optics.columns
        else np.arange(1, len(optics) + 1)
    )
    numeric = {c: pd.to_numeric(optics[c], errors="coerce").to_numpy() for c in optics.columns}
    groups = []
    for row in range(len(optics)):
        members = np.flatnonzero(optics_row == row)

        def value(column: str, per_particle: np.ndarray, members=members, row=row) -> float:
            if members.size:
                return float(per_particle[members[0]])
            if column in numeric:
                return float(numeric[column][row])
            return float("nan")

        number = int(numbers[row])
        name = (
            str(optics["rlnOpticsGroupName"].iloc[row])
            if "rlnOpticsGroupName" in optics.columns
            else f"opticsGroup{number}"
        )
        group_box = value("rlnImageSize", box)
        groups.append(
            OpticsGroup(
                name=name,
                number=number,
                voltage_kv=value("rlnVoltage", ctf_values["rlnVoltage"]),
                spherical_aberration_mm=value(
                    "rlnSphericalAberration", ctf_values["rlnSphericalAberration"]
                ),
                amplitude_contrast=value(
                    "rlnAmplitudeContrast", ctf_values["rlnAmplitudeContrast"]
                ),
                pixel_size_a=value("rlnImagePixelSize", pixel),
                box_size=int(group_box) if np.isfinite(group_box) else 0,
            )
        )
    return groups, numbers[optics_row]


def _groups_from_values(
    ctf_values: dict[str, np.ndarray], pixel: np.ndarray, box: np.ndarray
) -> tuple[list[OpticsGroup], np.ndarray]:
    """RELION 3.0 files have no optics table: one group per distinct optics setting."""
    keys = np.stack(
        [
            ctf_values["rlnVoltage"],
            ctf_values["rlnSphericalAberration"],
            ctf_values["rlnAmplitudeContrast"],
            np.round(pixel, 6),
            box.astype(np.float64),
        ],
        axis=1,
    )
    keys = np.where(np.isnan(keys), -1.0, keys)  # NaN pixel sizes compare equal here
    unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # number groups in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    groups = []
    for k, u in enumerate(order):
        i = first[u]
        groups.append(
            OpticsGroup(
                name=f"opticsGroup{k + 1}",
                number=k + 1,
                voltage_kv=float(ctf_values["rlnVoltage"][i]),
                spherical_aberration_mm=float(ctf_values["rlnSphericalAberration"][i]),
                amplitude_contrast=float(ctf_values["rlnAmplitudeContrast"][i]),
                pixel_size_a=float(pixel[i]),
                box_size=int(box[i]),
            )
        )
    del unique
    return groups, rank[inverse.reshape(-1)] + 1


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
    columns = {
        "rlnDefocusU": ctf.defocus_u_a,
        "rlnDefocusV": ctf.defocus_v_a,
        "rlnDefocusAngle": ctf.defocus_angle_deg,
        "rlnPhaseShift": ctf.phase_shift_deg,
        "rlnCtfBfactor": ctf.bfactor_a2,
        "rlnCtfScalefactor": ctf.scale,
    }
    return pd.DataFrame({k: v.detach().cpu().to(torch.float64).numpy() for k, v in columns.items()})


__all__ = [
    "ANGLE_COLUMNS",
    "CTF_COLUMNS",
    "ctf_table",
    "read_particle_star",
    "read_star",
    "split_particle_blocks",
    "write_particles_star",
]
