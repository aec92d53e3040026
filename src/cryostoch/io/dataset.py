"""`ParticleDataset`: one lazy view of particles from a STAR file, a cryoSPARC `.cs` file or a
bare MRC stack, with CTFs, optional poses and memory-mapped images.

`open_particles(path)` checks everything it can cheaply before any work: the metadata (CTF
columns, finite values, one pixel size and box) and every referenced stack (found, readable,
long enough, right box) from its header. Images are read only by `read_images` / `iter_chunks`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io.cryosparc import read_particle_cs
from cryostoch.io.mrc import MrcStack, read_header
from cryostoch.io.records import OpticsGroup, ParticleTable, Poses, StackRef
from cryostoch.io.star import ctf_table
from cryostoch.io.star_particles import read_particle_star
from cryostoch.io.table_builder import (
    ParticleSource,
    PixelSource,
    build_table,
    header_pixel_source,
)
from cryostoch.operators.ctf import CtfParameters

STACK_SUFFIXES = (".mrcs", ".mrc", ".st")
# Pixel sizes that differ by less than this (relative) count as one pixel size.
PIXEL_SIZE_RTOL = 1e-4
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


def read_particle_table(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """Read a particle file (.star, .cs, or an MRC stack) without requiring one consistent set.

    With `check_images=False` missing or short stacks are recorded instead of raising, so
    metadata-only files can be read (e.g. CTF tables, `.cs` files without their images).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a particle file")
    if suffix == ".star":
        return read_particle_star(path, project_root, check_images)
    if suffix == ".cs":
        return read_particle_cs(path, project_root, check_images)
    if suffix in STACK_SUFFIXES:
        # a stack is its own image: always checked, whatever check_images says
        return build_table(StackParticles(path), check_images=True)
    raise InputError(
        path, f"unknown particle file type {suffix!r}: expected .star, .cs, .mrcs or .mrc"
    )


class StackParticles(ParticleSource):
    """`build_table` adapter of a bare MRC stack: no CTF, pixel size from the header."""

    kind = "mrc"
    has_ctf = False
    extra_notes = ("no CTF (bare image stack)",)

    def __init__(self, path: Path):
        self.source = path
        self.header = read_header(path)
        nz, ny, nx = self.header.shape
        if ny != nx:
            raise InputError(path, f"images are {ny} x {nx}, not square")
        if self.header.space_group != 0 and nz == nx and not self.header.is_stack:
            raise InputError(
                path,
                f"looks like a {nz}^3 map (space group {self.header.space_group}), not an "
                "image stack",
            )
        names = [f"{i + 1:06d}@{path.name}" for i in range(nz)]
        self.metadata = pd.DataFrame({"rlnImageName": names})

    def locate(
        self, project_root: str | os.PathLike[str] | None, check_images: bool
    ) -> tuple[np.ndarray, np.ndarray, list[StackRef]]:
        n = len(self)  # the file is its own (checked) stack: nothing to look for
        ref = StackRef(str(self.source), self.source, (self.source,), self.header, None)
        return np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), [ref]

    def pixel_sources(self, header_pixel: np.ndarray) -> list[PixelSource]:
        return [header_pixel_source(header_pixel, "the MRC header")]

    def no_pixel_size(self, first: int) -> str:
        return "the MRC header sets no pixel size; use a STAR file that gives rlnImagePixelSize"


def open_particles(
    path: str | os.PathLike[str],
    project_root: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = True,
) -> ParticleDataset:
    """Open a particle file as a ParticleDataset, dispatching on the extension.

    `.star` (RELION 3.0 or 3.1+), `.cs` (cryoSPARC) or `.mrcs` / `.mrc` (a bare stack: no CTF,
    pixel size from the header). Relative stack paths are resolved against the file's folder
    and its ancestors, or only against `project_root` when given. With `check_images=False`
    a file whose stacks are missing still opens (metadata only; `read_images` then raises).
    """
    return ParticleDataset.from_table(
        read_particle_table(path, project_root, check_images), require_images=check_images
    )


class _StackCache:
    """Open memory-mapped stacks, least recently used closed first (bounded open files)."""

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._open: OrderedDict[int, MrcStack] = OrderedDict()

    def get(self, key: int, ref: StackRef) -> MrcStack:
        stack = self._open.get(key)
        if stack is None:
            stack = MrcStack(ref.header)
            self._open[key] = stack
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        else:
            self._open.move_to_end(key)
        return stack

    def close(self) -> None:
        while self._open:
            _, stack = self._open.popitem()
            stack.close()

    def __getstate__(self) -> dict:  # memory maps do not pickle: workers reopen them
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])


def _format_sizes(values: dict[str, float], unit: str) -> str:
    return ", ".join(f"{name}: {v:g}{unit}" for name, v in values.items())


class ParticleDataset:
    """Particles with CTFs, optional poses and lazily read images (see `open_particles`).

    Attributes: `source_path`, `n_particles` (= `len()`), `box_size`, `pixel_size_a`, `ctf`
    (CtfParameters of float64 tensors, None for a bare stack), `optics_group` (group number per
    particle), `optics_groups`, `poses` (None unless the file has all three angles),
    `metadata` (the original columns, one row per particle), `optics_table`, `stacks`, and
    `source_rows` (the row of each particle in the source file).
    """

    def __init__(
        self,
        *,
        source_path: Path,
        kind: str,
        metadata: pd.DataFrame,
        optics_table: pd.DataFrame | None,
        optics_groups: list[OpticsGroup],
        optics_group: np.ndarray,
        ctf: CtfParameters | None,
        poses: Poses | None,
        pixel_size_a: float,
        box_size: int,
        stacks: list[StackRef],
        stack_id: np.ndarray,
        stack_slot: np.ndarray,
        source_rows: np.ndarray,
        notes: list[str] | None = None,
        _cache: _StackCache | None = None,
    ):
        self.source_path = Path(source_path)
        self.kind = kind
        self.metadata = metadata
        self.optics_table = optics_table
        self.optics_groups = list(optics_groups)
        self.optics_group = optics_group
        self.ctf = ctf
        self.poses = poses
        self.pixel_size_a = float(pixel_size_a)
        self.box_size = int(box_size)
        self.stacks = stacks
        self.source_rows = source_rows
        self.notes = list(notes or [])
        self._stack_id = stack_id
        self._slot = stack_slot
        self._cache = _cache if _cache is not None else _StackCache()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: ParticleTable, require_images: bool = True) -> ParticleDataset:
        """Check that a table is one usable data set: one pixel size and one box."""
        source = table.source_path
        n = len(table)
        if n == 0:
            raise InputError(source, "no particles")
        pixel = np.asarray(table.pixel_size_a, dtype=np.float64)
        if np.isnan(pixel).any():
            raise InputError(source, "the pixel size is unknown (not in the file nor in a header)")
        by_group = _per_group(table, pixel)
        if np.ptp(pixel) > PIXEL_SIZE_RTOL * pixel.max():
            raise InputError(
                source,
                "the particles have different pixel sizes "
                f"({_format_sizes(by_group, ' A')}); cryostoch needs one pixel size and box "
                "for the whole set: select one optics group (or rescale)",
            )
        box = np.asarray(table.box_size, dtype=np.int64)
        known = np.unique(box[box > 0])
        if known.size > 1:
            sizes = _per_group(table, box.astype(np.float64))
            raise InputError(
                source,
                f"the particles have different box sizes ({_format_sizes(sizes, ' px')}); "
                "cryostoch needs one box size for the whole set",
            )
        if require_images:
            if not table.has_images:
                raise InputError(source, "the file names no particle images")
            missing = table.missing_stacks
            if missing:
                raise InputError(source, f"image stack {missing[0].written}: {missing[0].problem}")
            if known.size == 0:
                raise InputError(source, "the box size is unknown")
        return cls(
            source_path=source,
            kind=table.kind,
            metadata=table.metadata.reset_index(drop=True),
            optics_table=table.optics_table,
            optics_groups=table.optics_groups,
            optics_group=np.asarray(table.optics_group, dtype=np.int64),
            ctf=table.ctf,
            poses=table.poses,
            pixel_size_a=float(pixel[0]),
            box_size=int(known[0]) if known.size else 0,
            stacks=table.stacks,
            stack_id=np.asarray(table.stack_id, dtype=np.int64),
            stack_slot=np.asarray(table.stack_slot, dtype=np.int64),
            source_rows=np.arange(n, dtype=np.int64),
            notes=table.notes,
        )

    # -- sizes --------------------------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return int(self.optics_group.shape[0])

    def __len__(self) -> int:
        return self.n_particles

    @property
    def has_images(self) -> bool:
        """True when every particle's image stack was found and checked."""
        if not self.stacks or (self._stack_id < 0).any():
            return False
        used = np.unique(self._stack_id)
        return all(self.stacks[i].header is not None for i in used)

    def __repr__(self) -> str:
        return (
            f"ParticleDataset({str(self.source_path)!r}, {self.n_particles} particles, "
            f"box {self.box_size}, {self.pixel_size_a:g} A/px, "
            f"{'with' if self.poses is not None else 'no'} poses)"
        )

    # -- selection ----------------------------------------------------------------------------
    def _indices(self, indices: object) -> np.ndarray:
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        if isinstance(indices, slice):
            return np.arange(self.n_particles, dtype=np.int64)[indices]
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_particles,):
                raise IndexError(
                    f"boolean mask of shape {idx.shape} for {self.n_particles} particles"
                )
            return np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_particles):
            raise IndexError(
                f"particle index out of range 0..{self.n_particles - 1}: "
                f"{idx[(idx < 0) | (idx >= self.n_particles)][0]}"
            )
        return idx

    def subset(self, indices: object) -> ParticleDataset:
        """A view of some particles (indices, boolean mask or slice): same files, fewer rows."""
        idx = self._indices(indices)
        t = torch.from_numpy(idx)
        return ParticleDataset(
            source_path=self.source_path,
            kind=self.kind,
            metadata=self.metadata.iloc[idx].reset_index(drop=True),
            optics_table=self.optics_table,
            optics_groups=self.optics_groups,
            optics_group=self.optics_group[idx],
            ctf=None if self.ctf is None else self.ctf.index(t),
            poses=None if self.poses is None else self.poses.index(t),
            pixel_size_a=self.pixel_size_a,
            box_size=self.box_size,
            stacks=self.stacks,
            stack_id=self._stack_id[idx],
            stack_slot=self._slot[idx],
            source_rows=self.source_rows[idx],
            notes=self.notes,
            _cache=self._cache,
        )

    # -- export -------------------------------------------------------------------------------
    def relion_tables(
        self, poses: Poses | None = None, absolute_paths: bool = True
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(optics, particles) DataFrames for `write_particles_star` (RELION 3.1 layout).

        STAR input keeps its original columns (RELION 3.0 per-particle optics columns move
        to the optics table); .cs and bare-stack input get rlnImageName and the CTF columns.
        `poses` (default: the dataset's own) are written as rlnAngleRot/Tilt/Psi and
        rlnOriginXAngst/YAngst = -shift * pixel size. With `absolute_paths`, rlnImageName
        names the stacks by their resolved absolute paths, so the file works from any folder.
        """
        optics = self._optics_dataframe()
        if self.kind == "star":
            particles = self.metadata.copy()
            if self.optics_table is None:
                particles = particles.drop(
                    columns=[c for c in _PER_PARTICLE_OPTICS if c in particles]
                )
        else:
            particles = pd.DataFrame(index=pd.RangeIndex(self.n_particles))
            if self.ctf is not None:
                particles = pd.concat([particles, ctf_table(self.ctf)], axis=1)
        particles["rlnOpticsGroup"] = self.optics_group
        if self.stacks and (self._stack_id >= 0).all():
            names = []
            for sid, slot in zip(self._stack_id.tolist(), self._slot.tolist(), strict=True):
                ref = self.stacks[sid]
                where = ref.path.resolve() if (absolute_paths and ref.path) else ref.written
                names.append(f"{slot + 1:06d}@{where}")
            particles["rlnImageName"] = names
        poses = self.poses if poses is None else poses
        if poses is not None:
            if len(poses) != self.n_particles:
                raise ValueError(f"{len(poses)} poses for {self.n_particles} particles")
            euler = poses.euler_deg.detach().cpu().to(torch.float64).numpy()
            shifts = poses.shifts_px.detach().cpu().to(torch.float64).numpy()
            particles = particles.drop(
                columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in particles]
            )
            for j, name in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
                particles[name] = euler[:, j]
            particles["rlnOriginXAngst"] = -shifts[:, 0] * self.pixel_size_a
            particles["rlnOriginYAngst"] = -shifts[:, 1] * self.pixel_size_a
        for axis in ("X", "Y"):  # RELION 3.0 origins in pixels -> 3.1 in Angstrom
            if f"rlnOrigin{axis}" in particles:
                pixels = pd.to_numeric(particles.pop(f"rlnOrigin{axis}"), errors="coerce")
                particles[f"rlnOrigin{axis}Angst"] = pixels * self.pixel_size_a
        return optics, particles

    def _optics_dataframe(self) -> pd.DataFrame:
        if self.optics_table is not None:
            return self.optics_table.copy()
        rows = []
        for g in self.optics_groups:
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

    # -- images -------------------------------------------------------------------------------
    def read_images(self, indices: object) -> Tensor:
        """Images of the particles at `indices`, in that order: float32 tensor (len, N, N)."""
        idx = self._indices(indices)
        n = self.box_size
        out = np.empty((idx.size, n, n), dtype=np.float32)
        if idx.size == 0:
            return torch.from_numpy(out)
        stack_id = self._stack_id[idx]
        slot = self._slot[idx]
        if (stack_id < 0).any():
            raise InputError(self.source_path, "the file names no particle images")
        order = np.argsort(stack_id, kind="stable")
        boundaries = np.flatnonzero(np.diff(stack_id[order])) + 1
        for group in np.split(order, boundaries):
            sid = int(stack_id[group[0]])
            ref = self.stacks[sid]
            if ref.header is None:
                raise InputError(
                    self.source_path, f"image stack {ref.written}: {ref.problem or 'unreadable'}"
                )
            stack = self._cache.get(sid, ref)
            wanted = slot[group]
            if wanted.max() >= stack.n_images:
                bad = int(wanted[wanted >= stack.n_images][0])
                raise InputError(
                    self.source_path,
                    f"image {bad + 1} (1-based) of stack {ref.path} is requested but the "
                    f"stack holds only {stack.n_images} images",
                )
            out[group] = stack.read(wanted)
        return torch.from_numpy(out)

    def iter_chunks(
        self, chunk_size: int, indices: object = None
    ) -> Iterator[tuple[np.ndarray, Tensor]]:
        """Yield `(indices, images)` for consecutive chunks of at most `chunk_size` particles."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        idx = np.arange(self.n_particles) if indices is None else self._indices(indices)
        for start in range(0, idx.size, chunk_size):
            chunk = idx[start : start + chunk_size]
            yield chunk, self.read_images(chunk)

    def close(self) -> None:
        """Close the memory-mapped stacks (they reopen on the next read)."""
        self._cache.close()

    def __enter__(self) -> ParticleDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _per_group(table: ParticleTable, values: np.ndarray) -> dict[str, float]:
    """First value of each optics group, by group name (for error messages)."""
    names = {g.number: g.name for g in table.optics_groups}
    out: dict[str, float] = {}
    groups = np.asarray(table.optics_group)
    for number in sorted(set(groups.tolist())):
        first = int(np.flatnonzero(groups == number)[0])
        out[names.get(number, f"group {number}")] = float(values[first])
    return out
