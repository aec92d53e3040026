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
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io.cryosparc import read_particle_cs
from cryostoch.io.mrc import MrcStack, read_header
from cryostoch.io.records import OpticsGroup, ParticleTable, Poses, StackRef
from cryostoch.io.star import relion_tables
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


@dataclass(frozen=True, eq=False)
class ParticleDataset:
    """Particles with CTFs, optional poses and lazily read images (see `open_particles`).

    A view of some rows of a ParticleTable that is one consistent set: `table` is shared,
    never copied, and `rows` (n,) int64 says which of its rows, in which order, this view
    holds (`source_rows`: the row of each particle in the source file). `subset` makes a new
    `rows` over the same table and the same open stacks.

    Per-particle attributes, indexed through `rows`: `metadata` (the original columns),
    `ctf` (CtfParameters of float64 tensors, None for a bare stack), `poses` (None unless the
    file has all three angles), `optics_group` (group number), `stack_id`, `stack_slot`.
    Shared ones: `source_path`, `kind`, `optics_table`, `optics_groups`, `stacks`, `notes`,
    and the set's one `pixel_size_a` (A) and `box_size` (px, 0 if unknown).
    """

    table: ParticleTable
    rows: np.ndarray
    pixel_size_a: float
    box_size: int
    _cache: _StackCache = field(default_factory=_StackCache, repr=False)

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
        return cls(table, np.arange(n, dtype=np.int64), float(pixel[0]),
                   int(known[0]) if known.size else 0)

    # -- what the whole set shares ------------------------------------------------------------
    @property
    def source_path(self) -> Path:
        return self.table.source_path

    @property
    def kind(self) -> str:
        return self.table.kind

    @property
    def optics_table(self) -> pd.DataFrame | None:
        return self.table.optics_table

    @property
    def optics_groups(self) -> list[OpticsGroup]:
        return self.table.optics_groups

    @property
    def stacks(self) -> list[StackRef]:
        return self.table.stacks

    @property
    def notes(self) -> list[str]:
        return self.table.notes

    # -- per particle, through `rows` (cached: a view never changes) --------------------------
    @property
    def source_rows(self) -> np.ndarray:
        return self.rows

    @cached_property
    def metadata(self) -> pd.DataFrame:
        return self.table.metadata.iloc[self.rows].reset_index(drop=True)

    @cached_property
    def ctf(self) -> CtfParameters | None:
        return None if self.table.ctf is None else self.table.ctf.index(self._torch_rows)

    @cached_property
    def poses(self) -> Poses | None:
        return None if self.table.poses is None else self.table.poses.index(self._torch_rows)

    @property
    def _torch_rows(self) -> Tensor:
        return torch.from_numpy(self.rows)

    @property
    def optics_group(self) -> np.ndarray:
        return self.table.optics_group[self.rows]

    @property
    def stack_id(self) -> np.ndarray:
        """(n,) index into `stacks` of each particle's stack, -1 without an image."""
        return self.table.stack_id[self.rows]

    @property
    def stack_slot(self) -> np.ndarray:
        """(n,) 0-based index of each particle's image in its stack."""
        return self.table.stack_slot[self.rows]

    def image_label(self, index: int) -> str:
        """Particle `index` (0-based, in this view) as the file names it: `slot@stack`, 1-based
        as in rlnImageName, and its 1-based row in the file."""
        row = int(self.rows[index])
        stack = self.stacks[int(self.table.stack_id[row])].written
        return f"image {int(self.table.stack_slot[row]) + 1}@{stack} (row {row + 1} of the file)"

    # -- sizes --------------------------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return int(self.rows.shape[0])

    def __len__(self) -> int:
        return self.n_particles

    @property
    def has_images(self) -> bool:
        """True when every particle's image stack was found and checked."""
        stack_id = self.stack_id
        if not self.stacks or (stack_id < 0).any():
            return False
        return all(self.stacks[i].header is not None for i in np.unique(stack_id))

    def __repr__(self) -> str:
        return (
            f"ParticleDataset({str(self.source_path)!r}, {self.n_particles} particles, "
            f"box {self.box_size}, {self.pixel_size_a:g} A/px, "
            f"{'with' if self.poses is not None else 'no'} poses)"
        )

    # -- selection ----------------------------------------------------------------------------
    def _indices(self, indices: object) -> np.ndarray:
        """(k,) int64 positions in this view from indices, a boolean mask or a slice."""
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        if isinstance(indices, slice):
            # contiguous: a negative step would give a view torch.from_numpy cannot take
            return np.ascontiguousarray(np.arange(self.n_particles, dtype=np.int64)[indices])
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
        """A view of some particles (indices, boolean mask or slice): same table, same open
        stacks, fewer rows."""
        return replace(self, rows=self.rows[self._indices(indices)])

    # -- export -------------------------------------------------------------------------------
    def relion_tables(
        self, poses: Poses | None = None, absolute_paths: bool = True
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(optics, particles) for `write_particles_star`: see `star.relion_tables`."""
        return relion_tables(self, poses=poses, absolute_paths=absolute_paths)

    # -- images -------------------------------------------------------------------------------
    def read_images(self, indices: object) -> Tensor:
        """Images of the particles at `indices`, in that order: float32 tensor (len, N, N)."""
        rows = self.rows[self._indices(indices)]
        n = self.box_size
        out = np.empty((rows.size, n, n), dtype=np.float32)
        if rows.size == 0:
            return torch.from_numpy(out)
        stack_id = self.table.stack_id[rows]
        slot = self.table.stack_slot[rows]
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
