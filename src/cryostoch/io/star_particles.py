"""RELION particle STAR files read into a ParticleTable: the STAR adapter of `build_table`.

RELION 3.0 files have one loop block (e.g. `data_` or `data_images`) with CTF and pixel size
per particle; RELION 3.1 / 4 / 5 files have `data_optics` + `data_particles`, and a column
missing from a particle's row is looked up in its optics group's row. Image names are
`index@stack` with a 1-based index; stack paths are relative to the STAR file's folder or
to a project folder (RELION's: an ancestor of the STAR file) and are searched in that order
unless `project_root` is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryostoch.errors import InputError
from cryostoch.io._common import check_finite, check_positive
from cryostoch.io.records import OpticsGroup, ParticleTable
from cryostoch.io.star import (
    ANGLE_COLUMNS,
    CTF_COLUMNS,
    STAR_CTF,
    read_star,
    split_particle_blocks,
)
from cryostoch.io.table_builder import (
    OPTICS_FIELDS,
    ParticleSource,
    PixelSource,
    build_table,
    header_pixel_source,
)


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


class StarParticles(ParticleSource):
    """`build_table` adapter of a RELION particle STAR file: a column is looked up per
    particle in the particle table, else in the particle's row of data_optics."""

    kind = "star"
    image_column = "rlnImageName"
    no_images = "no rlnImageName column"

    def __init__(self, path: Path):
        self.source = path
        optics, particles = split_particle_blocks(path, read_star(path))
        self.metadata = particles.reset_index(drop=True)
        if optics is not None:
            optics = optics.reset_index(drop=True)
            if len(optics) == 0:
                optics = None
        self.optics_table = optics
        if len(self.metadata) == 0:
            raise InputError(path, "the particle table is empty")
        self.optics_row = None if optics is None else _optics_rows(path, self.metadata, optics)
        missing = [c for c in CTF_COLUMNS if not self.has(c)]
        if missing:
            raise InputError(
                path,
                f"missing CTF columns: {', '.join(missing)} (a particle STAR file needs defocus "
                "U, V and angle, voltage, spherical aberration and amplitude contrast)",
            )

    def has(self, name: str) -> bool:
        return name in self.metadata.columns or (
            self.optics_table is not None and name in self.optics_table.columns
        )

    def values(self, name: str) -> np.ndarray | None:
        """(n,) float64 values of a column, checked finite; None if there is no such column."""
        if name in self.metadata.columns:
            series = self.metadata[name]
        elif self.optics_table is not None and name in self.optics_table.columns:
            series = self.optics_table[name].iloc[self.optics_row]
        else:
            return None
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        check_finite(self.source, name, values)
        return values

    def _positive(self, name: str) -> np.ndarray | None:
        if not self.has(name):
            return None
        values = self.values(name)
        check_positive(self.source, name, values)
        return values

    def _detector_pixel_size(self) -> np.ndarray | None:
        """RELION 3.0 files may give only the detector pixel (um) and the magnification."""
        if not (self.has("rlnDetectorPixelSize") and self.has("rlnMagnification")):
            return None
        detector = self.values("rlnDetectorPixelSize")
        magnification = self.values("rlnMagnification")
        check_positive(self.source, "rlnDetectorPixelSize", detector)
        check_positive(self.source, "rlnMagnification", magnification)
        return detector * 1e4 / magnification

    def image_references(self) -> tuple[np.ndarray, pd.Series] | None:
        if "rlnImageName" not in self.metadata.columns:
            return None
        return _parse_image_names(self.source, self.metadata["rlnImageName"])

    def pixel_sources(self, header_pixel: np.ndarray) -> list[PixelSource]:
        return [
            ("rlnImagePixelSize", lambda: self._positive("rlnImagePixelSize")),
            ("rlnPixelSize", lambda: self._positive("rlnPixelSize")),
            ("rlnDetectorPixelSize * 1e4 / rlnMagnification", self._detector_pixel_size),
            header_pixel_source(header_pixel),
        ]

    def no_pixel_size(self, first: int) -> str:
        return (
            f"no pixel size for particle {first + 1}: no rlnImagePixelSize, rlnPixelSize or "
            "rlnDetectorPixelSize + rlnMagnification, and its stack header sets none"
        )

    def recorded_box(self) -> np.ndarray | None:
        values = self._positive("rlnImageSize")
        return None if values is None else values.astype(np.int64)

    def ctf_name(self, field: str) -> str:
        return STAR_CTF[field]

    def ctf_values(self, field: str) -> np.ndarray | None:
        return self.values(STAR_CTF[field])

    def origins(self, pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Only with all three angles; origins in Angstrom (3.1+) or pixels (3.0)."""
        columns = self.metadata.columns
        if not all(c in columns for c in ANGLE_COLUMNS):
            return None
        euler = np.stack([self.values(c) for c in ANGLE_COLUMNS], axis=1)
        if "rlnOriginXAngst" in columns and "rlnOriginYAngst" in columns:
            origin_a = [self.values("rlnOriginXAngst"), self.values("rlnOriginYAngst")]
            return euler, np.stack(origin_a, axis=1) / pixel[:, None]
        if "rlnOriginX" in columns and "rlnOriginY" in columns:
            return euler, np.stack([self.values("rlnOriginX"), self.values("rlnOriginY")], axis=1)
        return euler, np.zeros((len(self), 2))

    def optics_groups(
        self, ctf: dict[str, np.ndarray] | None, pixel: np.ndarray, box: np.ndarray
    ) -> tuple[list[OpticsGroup], np.ndarray] | None:
        if self.optics_table is None:
            return None  # RELION 3.0: grouped by value
        return _groups_from_optics(self.optics_table, self.optics_row, ctf, pixel, box)


def _groups_from_optics(
    optics: pd.DataFrame,
    optics_row: np.ndarray,
    ctf: dict[str, np.ndarray],
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
        microscope = {f: value(STAR_CTF[f], ctf[f]) for f in OPTICS_FIELDS}
        groups.append(
            OpticsGroup(
                name=name,
                number=number,
                **microscope,
                pixel_size_a=value("rlnImagePixelSize", pixel),
                box_size=int(group_box) if np.isfinite(group_box) else 0,
            )
        )
    return groups, numbers[optics_row]


def read_particle_star(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """Read a RELION particle STAR file into a ParticleTable (see `open_particles`)."""
    return build_table(StarParticles(Path(path)), project_root, check_images)
