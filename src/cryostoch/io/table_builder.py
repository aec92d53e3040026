"""One builder for every particle reader: a format adapter in, a `ParticleTable` out.

Each format (RELION STAR, cryoSPARC `.cs`, a bare MRC stack) has a small adapter, a subclass
of `ParticleSource`, that only translates its own columns into common per-particle arrays in
the units of `CtfParameters` and `Poses`. `build_table` does what every format shares, once
and in the same order for every format: find and check the image stacks, resolve the pixel
size and the box, check the CTF, turn origins into model shifts, group particles by optics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cryostoch.errors import InputError
from cryostoch.io._common import check_positive
from cryostoch.io.records import (
    OpticsGroup,
    ParticleTable,
    StackRef,
    as_tensor64,
    check_stack_boxes,
    locate_images,
    pixel_and_box_from_stacks,
    poses_from_arrays,
)
from cryostoch.operators.ctf import CtfParameters

# CtfParameters fields every file must give, and the defaults of those it may leave out.
CTF_REQUIRED = (
    "defocus_u_a",
    "defocus_v_a",
    "defocus_angle_deg",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
)
CTF_OPTIONAL = {"phase_shift_deg": 0.0, "bfactor_a2": 0.0, "scale": 1.0}
# The CtfParameters fields that are also OpticsGroup fields.
OPTICS_FIELDS = ("voltage_kv", "spherical_aberration_mm", "amplitude_contrast")
HEADER_PIXEL_SIZE = "the MRC header of the stacks"
# Physically possible CTF values (wide: they catch unit mistakes, not unusual microscopes).
MAX_DEFOCUS_A = 1e6  # 100 um
VOLTAGE_RANGE_KV = (10.0, 3000.0)
MAX_ABS_CS_MM = 20.0

# (what the note calls it, a function giving per-particle pixel sizes in A or None if absent)
PixelSource = tuple[str, Callable[[], np.ndarray | None]]


class ParticleSource:
    """What a format adapter tells `build_table`, one row per particle.

    A subclass reads its file in `__init__`, raising InputError there for what only its format
    can get wrong (no CTF columns, an empty table), and sets `source`, `metadata` (the
    original columns) and, where they differ from the defaults, the class attributes below.
    """

    source: Path
    kind: str  # "star", "cs" or "mrc"
    metadata: pd.DataFrame
    optics_table: pd.DataFrame | None = None
    image_column = ""  # where the file writes image paths, named in errors
    no_images = ""  # why the file names no images, named in the error
    has_ctf = True
    extra_notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.metadata)

    def image_references(self) -> tuple[np.ndarray, pd.Series] | None:
        """(0-based image index, stack path as written) per particle; None if no images."""
        return None

    def locate(
        self, project_root: str | os.PathLike[str] | None, check_images: bool
    ) -> tuple[np.ndarray, np.ndarray, list[StackRef]]:
        """(stack_slot, stack_id, stacks): see `locate_images`."""
        return locate_images(self.source, len(self), self.image_references(), project_root,
                             check_images, self.image_column, self.no_images)

    def pixel_sources(self, header_pixel: np.ndarray) -> list[PixelSource]:
        """Where the pixel size may come from, most trusted first (`header_pixel` (n,) in A,
        NaN where the stack header sets none)."""
        raise NotImplementedError

    def no_pixel_size(self, first: int) -> str:
        """The problem when particle `first` (0-based) has no pixel size from any source."""
        raise NotImplementedError

    def recorded_box(self) -> np.ndarray | None:
        """(n,) int64 box in pixels as the file records it (checked), or None if it does not."""
        return None

    def ctf_name(self, field: str) -> str:
        """The file's name for a CtfParameters field, for messages."""
        raise NotImplementedError

    def ctf_values(self, field: str) -> np.ndarray | None:
        """(n,) float64 values of a CtfParameters field in its units, checked finite; None
        when the file lacks it (only optional fields may be absent)."""
        raise NotImplementedError

    def amplitude_contrast_problem(self, q0: np.ndarray, first: int) -> str:
        return (
            f"{self.ctf_name('amplitude_contrast')} must be in [0, 1), got {q0[first]:g} "
            f"(particle {first + 1})"
        )

    def origins(self, pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(euler_deg (n, 3) RELION rot, tilt, psi; origin_px (n, 2) RELION's origin in
        pixels of the images), or None without poses. `pixel` (n,) is in A."""
        return None

    def optics_groups(
        self, ctf: dict[str, np.ndarray] | None, pixel: np.ndarray, box: np.ndarray
    ) -> tuple[list[OpticsGroup], np.ndarray] | None:
        """(groups, group number per particle) where the file lists its optics groups; None
        to group the particles by their optics values."""
        return None

    def group_key(self) -> np.ndarray | None:
        """(n,) float64 label that also separates groups (cryoSPARC's exposure group)."""
        return None

    def group_name(self, first: int, k: int) -> str:
        """Name of the `k`-th (0-based) group found by value; `first` is its first particle."""
        return f"opticsGroup{k + 1}"


def header_pixel_source(header_pixel: np.ndarray, label: str = HEADER_PIXEL_SIZE) -> PixelSource:
    """The stack headers as a pixel size source, used only where some header sets one."""
    return label, lambda: None if np.isnan(header_pixel).all() else header_pixel


def build_table(
    adapter: ParticleSource,
    project_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> ParticleTable:
    """The ParticleTable of the file `adapter` has read (see `read_particle_table`)."""
    n = len(adapter)
    slot, stack_id, stacks = adapter.locate(project_root, check_images)
    header_pixel, header_box = pixel_and_box_from_stacks(stacks, stack_id)
    pixel, notes = _pixel_sizes(adapter, header_pixel, check_images)
    box = adapter.recorded_box()
    # the stacks must agree with a recorded box; without one they give it
    check_stack_boxes(adapter.source, stacks, stack_id,
                      np.zeros(n, dtype=np.int64) if box is None else box)
    if box is None:
        box = np.where(header_box > 0, header_box, 0).astype(np.int64)
    ctf_values = _ctf_values(adapter) if adapter.has_ctf else None
    origins = adapter.origins(pixel)
    # the model's shift moves the particle centre to N // 2 + t, RELION's origin is -t
    poses = None if origins is None else poses_from_arrays(origins[0], -origins[1])
    grouped = adapter.optics_groups(ctf_values, pixel, box)
    groups, group_of = grouped or _groups_by_value(adapter, ctf_values, pixel, box)
    return ParticleTable(
        source_path=adapter.source,
        kind=adapter.kind,
        metadata=adapter.metadata,
        optics_table=adapter.optics_table,
        optics_groups=groups,
        optics_group=group_of,
        ctf=None if ctf_values is None else CtfParameters(
            **{name: as_tensor64(values) for name, values in ctf_values.items()}),
        poses=poses,
        pixel_size_a=pixel,
        box_size=box,
        stacks=stacks,
        stack_id=stack_id,
        stack_slot=slot,
        notes=notes + list(adapter.extra_notes),
    )


def _pixel_sizes(
    adapter: ParticleSource, header_pixel: np.ndarray, check_images: bool
) -> tuple[np.ndarray, list[str]]:
    """(n,) pixel sizes in A filled from the adapter's sources in turn, and a note for each
    source used. Unknown sizes stay NaN unless `check_images` (then InputError)."""
    pixel = np.full(len(adapter), np.nan)
    notes = []
    for label, values_of in adapter.pixel_sources(header_pixel):
        if not np.isnan(pixel).any():
            break
        values = values_of()
        if values is not None:
            pixel = np.where(np.isnan(pixel), values, pixel)
            notes.append(f"pixel size from {label}")
    if np.isnan(pixel).any() and check_images:
        first = int(np.flatnonzero(np.isnan(pixel))[0])
        raise InputError(adapter.source, adapter.no_pixel_size(first))
    return pixel, notes


def _check_range(adapter: ParticleSource, field: str, values: np.ndarray,
                 bounds: tuple[float, float], hint: str) -> None:
    """InputError naming the file's column and the first particle outside [low, high]."""
    low, high = bounds
    bad = (values < low) | (values > high)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            adapter.source,
            f"{adapter.ctf_name(field)} is {values[first]:g} for particle {first + 1} "
            f"({int(bad.sum())} of {values.size} out of range): {hint}",
        )


def check_ctf_values(adapter: ParticleSource, values: dict[str, np.ndarray]) -> None:
    """Refuse CTF values no microscope has, for every format alike (values in the units of
    CtfParameters): defocus <= 0, a voltage in V rather than kV, a Cs in um rather than mm."""
    for field in ("defocus_u_a", "defocus_v_a"):
        check_positive(adapter.source, adapter.ctf_name(field), values[field])
        _check_range(adapter, field, values[field], (0.0, MAX_DEFOCUS_A),
                     f"expected Angstrom of underfocus, at most {MAX_DEFOCUS_A:g}")
    check_positive(adapter.source, adapter.ctf_name("voltage_kv"), values["voltage_kv"])
    _check_range(adapter, "voltage_kv", values["voltage_kv"], VOLTAGE_RANGE_KV,
                 f"expected kV, between {VOLTAGE_RANGE_KV[0]:g} and {VOLTAGE_RANGE_KV[1]:g}")
    _check_range(adapter, "spherical_aberration_mm", values["spherical_aberration_mm"],
                 (-MAX_ABS_CS_MM, MAX_ABS_CS_MM), f"expected mm, at most {MAX_ABS_CS_MM:g}")


def _ctf_values(adapter: ParticleSource) -> dict[str, np.ndarray]:
    """All CtfParameters fields as (n,) float64 arrays, checked (`check_ctf_values`,
    0 <= Q0 < 1)."""
    values = {name: adapter.ctf_values(name) for name in CTF_REQUIRED}
    check_ctf_values(adapter, values)
    q0 = values["amplitude_contrast"]
    bad = (q0 < 0) | (q0 >= 1)
    if bad.any():
        raise InputError(
            adapter.source, adapter.amplitude_contrast_problem(q0, int(np.flatnonzero(bad)[0]))
        )
    for name, default in CTF_OPTIONAL.items():
        given = adapter.ctf_values(name)
        values[name] = np.full(len(adapter), default) if given is None else given
    return values


def _groups_by_value(
    adapter: ParticleSource,
    ctf: dict[str, np.ndarray] | None,
    pixel: np.ndarray,
    box: np.ndarray,
) -> tuple[list[OpticsGroup], np.ndarray]:
    """One group per distinct (group key, voltage, Cs, Q0, pixel size, box), numbered 1, 2, ...
    in order of first appearance; NaN optics values (no CTF) count as one value."""
    n = len(adapter)
    key = adapter.group_key()
    optics = {name: np.full(n, np.nan) if ctf is None else ctf[name] for name in OPTICS_FIELDS}
    keys = np.stack([np.zeros(n) if key is None else key, *optics.values(), np.round(pixel, 6),
                     box.astype(np.float64)], axis=1)
    keys = np.where(np.isnan(keys), -1.0, keys)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    groups = []
    for k, u in enumerate(order):
        i = first[u]
        groups.append(
            OpticsGroup(
                name=adapter.group_name(i, k),
                number=k + 1,
                **{name: float(values[i]) for name, values in optics.items()},
                pixel_size_a=float(pixel[i]),
                box_size=int(box[i]),
            )
        )
    return groups, rank[inverse.reshape(-1)] + 1
