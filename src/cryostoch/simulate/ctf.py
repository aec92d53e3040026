"""CTF parameters for simulated particles: drawn from a real data set's table (as the paper
did), or from documented defaults.

- `CtfTable.read(path)`: every row of a RELION STAR or cryoSPARC .cs file (images not needed)
  is one CTF parameter set (defocus U/V, astigmatism angle, phase shift) with its optics
  (voltage, Cs, amplitude contrast). Particles draw rows uniformly with replacement.
- `DefaultCtf()`: 300 kV, Cs 2.7 mm, amplitude contrast 0.1, no astigmatism, defocus uniform
  in 1-3 um (10,000-30,000 A underfocus).

Either way the B-factor is 0 and the scale 1. Optics groups of the output are the distinct
(voltage, Cs, amplitude contrast) settings of the source, numbered from 1 in order of first
appearance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.operators.ctf import CtfParameters

DEFAULT_VOLTAGE_KV = 300.0
DEFAULT_SPHERICAL_ABERRATION_MM = 2.7
DEFAULT_AMPLITUDE_CONTRAST = 0.1
DEFAULT_DEFOCUS_RANGE_A = (10_000.0, 30_000.0)


@dataclass(frozen=True)
class Optics:
    """One optics setting: what the microscope was."""

    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float


def _parameters(
    defocus_u: Tensor, defocus_v: Tensor, angle: Tensor, phase: Tensor, optics: list[Optics],
    group: np.ndarray,
) -> CtfParameters:
    n = defocus_u.shape[0]
    g = torch.from_numpy(np.asarray(group, dtype=np.int64))
    voltage = torch.tensor([o.voltage_kv for o in optics], dtype=torch.float64)[g]
    cs = torch.tensor([o.spherical_aberration_mm for o in optics], dtype=torch.float64)[g]
    q0 = torch.tensor([o.amplitude_contrast for o in optics], dtype=torch.float64)[g]
    zeros = torch.zeros(n, dtype=torch.float64)
    return CtfParameters(
        defocus_u_a=defocus_u.to(torch.float64),
        defocus_v_a=defocus_v.to(torch.float64),
        defocus_angle_deg=angle.to(torch.float64),
        voltage_kv=voltage,
        spherical_aberration_mm=cs,
        amplitude_contrast=q0,
        phase_shift_deg=phase.to(torch.float64),
        bfactor_a2=zeros,
        scale=torch.ones(n, dtype=torch.float64),
    )


class CtfSampler:
    """Draws CTF parameters for `n` particles: `draw(n, generator) -> (CtfParameters, group)`
    with `group` the 0-based index into `optics` of each particle."""

    optics: list[Optics]
    description: str

    def draw(self, n: int, generator: torch.Generator) -> tuple[CtfParameters, np.ndarray]:
        raise NotImplementedError


class DefaultCtf(CtfSampler):
    """Documented defaults (see the module docstring)."""

    def __init__(
        self,
        voltage_kv: float = DEFAULT_VOLTAGE_KV,
        spherical_aberration_mm: float = DEFAULT_SPHERICAL_ABERRATION_MM,
        amplitude_contrast: float = DEFAULT_AMPLITUDE_CONTRAST,
        defocus_range_a: tuple[float, float] = DEFAULT_DEFOCUS_RANGE_A,
    ):
        lo, hi = defocus_range_a
        if not 0 <= lo <= hi:
            raise ValueError(f"invalid defocus range {defocus_range_a}")
        self.optics = [Optics(voltage_kv, spherical_aberration_mm, amplitude_contrast)]
        self.defocus_range_a = (float(lo), float(hi))
        self.description = (
            f"defaults: {voltage_kv:g} kV, Cs {spherical_aberration_mm:g} mm, "
            f"Q0 {amplitude_contrast:g}, defocus uniform {lo / 1e4:g}-{hi / 1e4:g} um"
        )

    def draw(self, n: int, generator: torch.Generator) -> tuple[CtfParameters, np.ndarray]:
        lo, hi = self.defocus_range_a
        defocus = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        zeros = torch.zeros(n, dtype=torch.float64)
        group = np.zeros(n, dtype=np.int64)
        return _parameters(defocus, defocus.clone(), zeros, zeros, self.optics, group), group


class CtfTable(CtfSampler):
    """Rows of a real CTF table, drawn uniformly with replacement."""

    def __init__(self, ctf: CtfParameters, source: str = "table"):
        n = len(ctf)
        if n == 0:
            raise ValueError("empty CTF table")
        settings = torch.stack(
            [ctf.voltage_kv, ctf.spherical_aberration_mm, ctf.amplitude_contrast], 1
        ).numpy()
        unique, first, inverse = np.unique(
            settings, axis=0, return_index=True, return_inverse=True
        )
        order = np.argsort(first)  # groups in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.optics = [Optics(*map(float, unique[u])) for u in order]
        self.row_group = rank[inverse.reshape(-1)].astype(np.int64)
        self.ctf = ctf
        self.description = f"{n:,} CTF parameter sets from {source}"

    def __len__(self) -> int:
        return len(self.ctf)

    @staticmethod
    def read(path: str | os.PathLike[str]) -> CtfTable:
        """Read a STAR or .cs file's CTF parameters; InputError if it has none or no rows."""
        from cryostoch.io.dataset import read_particle_table

        path = Path(path)
        table = read_particle_table(path, check_images=False)
        if table.ctf is None or len(table) == 0:
            raise InputError(path, "no CTF parameters in the file")
        ctf = table.ctf  # checked by the reader, as for every command
        return CtfTable(ctf, path.name)

    def draw(self, n: int, generator: torch.Generator) -> tuple[CtfParameters, np.ndarray]:
        rows = torch.randint(len(self.ctf), (n,), generator=generator)
        group = self.row_group[rows.numpy()]
        picked = self.ctf.index(rows)
        params = _parameters(
            picked.defocus_u_a, picked.defocus_v_a, picked.defocus_angle_deg,
            picked.phase_shift_deg, self.optics, group,
        )
        return params, group


__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "DEFAULT_DEFOCUS_RANGE_A",
    "DEFAULT_SPHERICAL_ABERRATION_MM",
    "DEFAULT_VOLTAGE_KV",
    "CtfSampler",
    "CtfTable",
    "DefaultCtf",
    "Optics",
]
