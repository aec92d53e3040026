"""Ground-truth densities from atomic models (PDB or mmCIF) with `gemmi`.

The model (first model of the file, waters removed) is translated so that its centre of mass
sits at the box centre (pixel `N // 2`), and its electron-scattering density
(`gemmi.DensityCalculatorE`: Peng's electron form factors, each atom blurred by its B-factor
plus `blur_a2`) is computed on a grid twice as fine as the output (spacing `pixel / 2`) and
then Fourier-cropped to the output box, so the result is band-limited at the output Nyquist
frequency without aliasing. The default blur, `8 * pixel^2` A^2, damps every atom to at most
exp(-2) of its amplitude at the fine grid's Nyquist frequency (even with a B-factor of 0) while
keeping detail up to the output's Nyquist frequency.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.fourier.resample import resample_volume

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz")
BLUR_PER_PX2 = 8.0  # default blur in A^2 per (pixel size in A)^2
GRID_OVERSAMPLING = 2


def is_atomic_model(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in MODEL_SUFFIXES)


@dataclass(frozen=True)
class AtomicModel:
    """An atomic model read with gemmi and its geometry (Angstrom)."""

    path: Path
    structure: object  # gemmi.Structure (first model only, no waters)
    n_atoms: int
    centre_of_mass_a: tuple[float, float, float]
    radius_a: float  # largest distance of an atom from the centre of mass

    @property
    def diameter_a(self) -> float:
        return 2 * self.radius_a


def read_atomic_model(path: str | os.PathLike[str]) -> AtomicModel:
    """Read a PDB or mmCIF file; InputError if it cannot be read or holds no atoms."""
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such atomic model file")
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # noqa: BLE001 - gemmi raises RuntimeError/ValueError/OSError
        raise InputError(
            path, f"not a readable PDB or mmCIF file ({type(err).__name__}: {err})"
        ) from None
    if len(structure) == 0:
        raise InputError(path, "the file holds no atomic model")
    while len(structure) > 1:  # keep the first model (NMR ensembles)
        del structure[len(structure) - 1]
    structure.remove_waters()
    structure.remove_empty_chains()
    model = structure[0]
    xyz = np.array(
        [[a.pos.x, a.pos.y, a.pos.z] for chain in model for res in chain for a in res],
        dtype=np.float64,
    ).reshape(-1, 3)
    if xyz.shape[0] == 0:
        raise InputError(path, "the model has no atoms (besides waters)")
    if not np.isfinite(xyz).all():
        raise InputError(path, "some atom coordinates are not finite")
    com = model.calculate_center_of_mass()
    centre = (com.x, com.y, com.z)
    radius = float(np.sqrt(((xyz - np.array(centre)) ** 2).sum(1)).max())
    return AtomicModel(path, structure, int(xyz.shape[0]), centre, radius)


def default_blur_a2(pixel_size_a: float) -> float:
    return BLUR_PER_PX2 * pixel_size_a**2


def atomic_model_margin_a(pixel_size_a: float, blur_a2: float | None = None) -> float:
    """How far (A) beyond the outermost atom centre the density still matters: three
    standard deviations of the blur Gaussian (B = 8 pi^2 sigma^2), at least two pixels."""
    blur = default_blur_a2(pixel_size_a) if blur_a2 is None else blur_a2
    return max(3 * math.sqrt(max(blur, 0.0) / (8 * math.pi**2)), 2 * pixel_size_a)


def atomic_model_volume(
    model: AtomicModel,
    box_size: int,
    pixel_size_a: float,
    *,
    blur_a2: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The model's density on a (box, box, box) grid `[z, y, x]` of spacing `pixel_size_a`,
    centre of mass at pixel `N // 2` (see the module docstring). Does not check that the model
    fits (the caller does, with `model.radius_a` and `atomic_model_margin_a`)."""
    import gemmi

    if box_size < 2 or not pixel_size_a > 0:
        raise ValueError(f"invalid box {box_size} or pixel size {pixel_size_a}")
    blur = default_blur_a2(pixel_size_a) if blur_a2 is None else float(blur_a2)
    if blur < 0:
        raise ValueError(f"blur must be >= 0, got {blur}")
    fine = box_size * GRID_OVERSAMPLING
    length = box_size * pixel_size_a
    # The fine grid's centre pixel fine // 2 = box_size sits at box_size * (pixel / 2) = L / 2,
    # which Fourier cropping maps onto the output's centre pixel box_size // 2.
    centre_a = (fine // 2) * pixel_size_a / GRID_OVERSAMPLING
    structure = model.structure.clone()
    cx, cy, cz = model.centre_of_mass_a
    shift = gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(centre_a - cx, centre_a - cy, centre_a - cz))
    structure[0].transform_pos_and_adp(shift)
    calculator = gemmi.DensityCalculatorE()
    calculator.grid.set_unit_cell(gemmi.UnitCell(length, length, length, 90, 90, 90))
    calculator.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calculator.grid.set_size(fine, fine, fine)
    calculator.blur = blur
    calculator.put_model_density_on_grid(structure[0])
    # gemmi's grid is indexed [x, y, z]
    density = np.array(calculator.grid.array, dtype=np.float32, copy=True).transpose(2, 1, 0)
    volume = torch.from_numpy(np.ascontiguousarray(density))
    del calculator, density
    return resample_volume(volume, box_size).to(dtype)


__all__ = [
    "BLUR_PER_PX2",
    "MODEL_SUFFIXES",
    "AtomicModel",
    "atomic_model_margin_a",
    "atomic_model_volume",
    "default_blur_a2",
    "is_atomic_model",
    "read_atomic_model",
]
