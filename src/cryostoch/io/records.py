"""The common form every particle reader produces: a `ParticleTable`.

A table is what a metadata file says, resolved (stack paths found, pixel sizes worked out)
but not yet required to be one consistent data set: `ParticleDataset.from_table` adds that
(one pixel size and box, images present). `cryostoch info` describes tables, so it can also
describe files that cannot be reconstructed as they are (mixed optics, metadata only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io._common import format_folders, search_folders
from cryostoch.io.mrc import MrcHeader, read_header
from cryostoch.operators.ctf import CtfParameters


@dataclass(frozen=True)
class OpticsGroup:
    """One optics group: what the microscope and extraction were for a set of particles.

    `box_size` is 0 when unknown (metadata only, no image size recorded).
    """

    name: str
    number: int
    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    pixel_size_a: float
    box_size: int


@dataclass(frozen=True)
class Poses:
    """Per-particle poses in the model convention (docs/conventions.md).

    `euler_deg` (n, 3): RELION (rot, tilt, psi) in degrees, float64.
    `shifts_px` (n, 2): (tx, ty) in pixels, the particle centre sits at `N // 2 + t`;
    `t = -origin` for RELION's rlnOriginX/Y and cryoSPARC's alignments3D/shift.
    """

    euler_deg: Tensor
    shifts_px: Tensor

    def __post_init__(self) -> None:
        n = self.euler_deg.shape[0]
        if self.euler_deg.shape != (n, 3) or self.shifts_px.shape != (n, 2):
            raise ValueError(
                f"Poses need euler_deg (n, 3) and shifts_px (n, 2), got "
                f"{tuple(self.euler_deg.shape)} and {tuple(self.shifts_px.shape)}"
            )

    def __len__(self) -> int:
        return int(self.euler_deg.shape[0])

    def index(self, indices: Tensor | np.ndarray | slice | list[int]) -> Poses:
        if isinstance(indices, np.ndarray):
            indices = torch.from_numpy(indices)
        return Poses(self.euler_deg[indices], self.shifts_px[indices])


@dataclass(frozen=True)
class StackRef:
    """An image stack named by a metadata file.

    `written` is the path as it appears in the file; `path` where it was found (None if it
    was not); `tried` the candidates looked at; `header` its checked MRC header (None when
    not found or unreadable, `problem` then says why).
    """

    written: str
    path: Path | None
    tried: tuple[Path, ...]
    header: MrcHeader | None = None
    problem: str | None = None

    @property
    def n_images(self) -> int | None:
        return None if self.header is None else self.header.shape[0]


@dataclass(frozen=True)
class ParticleTable:
    """Everything a reader found in a particle file, one row per particle.

    `pixel_size_a` and `box_size` are per particle (NaN / 0 when unknown); `stack_id` indexes
    `stacks` (-1 for particles without an image) and `stack_slot` is the 0-based image index
    in that stack.
    """

    source_path: Path
    kind: str  # "star", "cs" or "mrc"
    metadata: pd.DataFrame
    optics_table: pd.DataFrame | None
    optics_groups: list[OpticsGroup]
    optics_group: np.ndarray
    ctf: CtfParameters | None
    poses: Poses | None
    pixel_size_a: np.ndarray
    box_size: np.ndarray
    stacks: list[StackRef]
    stack_id: np.ndarray
    stack_slot: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.optics_group.shape[0])

    @property
    def has_images(self) -> bool:
        return bool(self.stacks) and bool((self.stack_id >= 0).all())

    @property
    def missing_stacks(self) -> list[StackRef]:
        return [s for s in self.stacks if s.header is None]


def resolve_stacks(
    source: Path,
    written_paths: Sequence[str],
    max_slot: Sequence[int],
    folders: Sequence[Path],
    check_images: bool,
    column: str,
) -> list[StackRef]:
    """Find and check the stacks named in `source`.

    `max_slot[i]` is the largest 0-based image index wanted from `written_paths[i]`. With
    `check_images`, a missing, unreadable or too short stack raises InputError at once (before
    any work is done); otherwise the problem is recorded in the StackRef.
    """
    refs: list[StackRef] = []
    for written, last in zip(written_paths, max_slot, strict=True):
        candidate = Path(written).expanduser()
        if candidate.is_absolute():
            order = [candidate]
        else:
            order = [f / candidate for f in folders]
        found = next((p for p in order if p.is_file()), None)
        if found is None:
            if candidate.is_absolute():
                tried, where = (candidate,), f"for {candidate}"
            else:
                tried = tuple(f / candidate for f in folders)
                where = f"under {format_folders(list(folders))}"
                if len(folders) > 1:
                    where += "; give the project folder as project root"
            if check_images:
                raise InputError(
                    source,
                    f"image stack {written} named in {column} does not exist (looked {where})",
                )
            refs.append(StackRef(written, None, tried, None, f"not found (looked {where})"))
            continue
        try:
            header = read_header(found)
        except InputError as err:
            if check_images:
                raise InputError(found, f"{err.problem} (image stack of {source})") from None
            refs.append(StackRef(written, found, (found,), None, err.problem))
            continue
        n = header.shape[0]
        if last >= n:
            problem = (
                f"image {last + 1} (1-based) of stack {found} is requested but the stack holds "
                f"only {n} images"
            )
            if check_images:
                raise InputError(source, problem)
            refs.append(StackRef(written, found, (found,), None, problem))
            continue
        refs.append(StackRef(written, found, (found,), header, None))
    return refs


def locate_images(
    source: Path,
    n: int,
    references: tuple[np.ndarray, pd.Series] | None,
    project_root,
    check_images: bool,
    column: str,
    missing: str,
) -> tuple[np.ndarray, np.ndarray, list[StackRef]]:
    """(slot, stack_id, stacks) of `n` particles from their image references.

    references: (0-based slot in its stack, stack path as written) per particle, or None
    where the file names no images (allowed only without `check_images`: metadata only;
    otherwise InputError "`missing`: the file names no particle images"). `column` names
    where the paths were written, for error messages. Relative paths are searched for from
    `source` and its ancestors, or `project_root`.
    """
    if references is None:
        if check_images:
            raise InputError(source, f"{missing}: the file names no particle images")
        return np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64), []
    slot, stack_paths = references
    stack_id, unique_paths = factorize_paths(stack_paths)
    stacks = resolve_stacks(source, unique_paths,
                            max_slot_per_stack(stack_id, slot, len(unique_paths)),
                            search_folders(source, project_root), check_images, column)
    return slot, stack_id, stacks


def factorize_paths(paths: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Integer code per row and the unique values, in order of first appearance."""
    codes, uniques = pd.factorize(paths, sort=False)
    return codes.astype(np.int64), [str(u) for u in uniques]


def max_slot_per_stack(stack_id: np.ndarray, slot: np.ndarray, n_stacks: int) -> list[int]:
    out = np.full(n_stacks, -1, dtype=np.int64)
    np.maximum.at(out, stack_id, slot)
    return [int(v) for v in out]


def pixel_and_box_from_stacks(
    stacks: Sequence[StackRef], stack_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle pixel size and box read from the stack headers (NaN / 0 where unknown)."""
    n_stacks = len(stacks)
    pix = np.full(n_stacks + 1, np.nan)
    box = np.zeros(n_stacks + 1, dtype=np.int64)
    for i, ref in enumerate(stacks):
        if ref.header is not None:
            ps = ref.header.pixel_size_a
            pix[i] = ps if ps > 0 else np.nan
            ny, nx = ref.header.shape[1:]
            box[i] = nx if nx == ny else -1
    # index n_stacks (= -1 after wrap) is "no stack": NaN / 0
    return pix[stack_id], box[stack_id]


def check_stack_boxes(
    source: Path, stacks: Sequence[StackRef], stack_id: np.ndarray, box: np.ndarray
) -> None:
    """InputError if a stack's images are not square or not of the recorded box size."""
    for i, ref in enumerate(stacks):
        if ref.header is None:
            continue
        ny, nx = ref.header.shape[1:]
        if ny != nx:
            raise InputError(ref.path or source, f"images are {ny} x {nx}, not square")
        rows = np.flatnonzero(stack_id == i)
        expected = set(int(b) for b in np.unique(box[rows]) if b > 0)
        if expected and expected != {nx}:
            raise InputError(
                source,
                f"stack {ref.path} holds {nx} x {nx} images but the file records a box of "
                f"{', '.join(map(str, sorted(expected)))} for its particles",
            )


def as_tensor64(values: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float64, copy=True))


def poses_from_arrays(euler_deg: np.ndarray, shifts_px: np.ndarray) -> Poses:
    return Poses(as_tensor64(euler_deg.reshape(-1, 3)), as_tensor64(shifts_px.reshape(-1, 2)))
