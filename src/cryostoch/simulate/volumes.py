"""Ground-truth densities for simulation: the built-in phantom, an MRC map or an atomic model,
on the requested box and pixel size, with a check that the molecule fits.

"Fits" means the molecule lies inside the box's inscribed sphere (radius `box * pixel / 2`
around the centre pixel `N // 2`), also after the largest simulated shift: projections are
periodic in the box, so anything beyond that sphere would wrap around in some orientation.

- `phantom`: see `cryostoch.simulate.phantom` (its bounding radius is known analytically).
- MRC map: scaled to the requested pixel size by Fourier crop/pad (band-limited resampling),
  then centred-cropped or zero-padded to the box. The map is first zero-padded to a size M'
  for which M' * voxel / pixel is an integer (to 1e-4), so the scaling is exact; the molecule
  is not recentred. Its radius is the distance from the centre within which 99.5% of the mass
  above 10% of the map's maximum lies (robust to noise in deposited maps).
- PDB / mmCIF: see `cryostoch.simulate.atomic` (centred on its centre of mass; radius = the
  outermost atom plus the blur).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.fourier.grids import fft3_grid
from cryostoch.fourier.resample import pad_real_space, resample_volume
from cryostoch.simulate.atomic import (
    atomic_model_margin_a,
    atomic_model_volume,
    is_atomic_model,
    read_atomic_model,
)
from cryostoch.simulate.phantom import phantom_radius_a, phantom_volume

PHANTOM = "phantom"
MAP_SUFFIXES = (".mrc", ".map", ".mrcs", ".rec")
MASS_FRACTION = 0.995  # a map's molecule radius holds this fraction of its significant mass
THRESHOLD_FRACTION = 0.10  # "significant": above this fraction of the map's maximum
SCALE_TOLERANCE = 1e-4  # relative pixel-size error accepted when resampling a map
MAX_PAD_SEARCH = 256  # how far beyond the map's size a size with an exact scale is sought


@dataclass(frozen=True)
class SourceVolume:
    """A ground-truth density `[z, y, x]` on the requested grid, and what it is."""

    volume: Tensor
    description: str
    radius_a: float  # the molecule's radius about the box centre, Angstrom


def _check_fits(source: str, what: str, radius_a: float, box: int, pixel: float,
                margin_a: float) -> None:
    needed = 2 * (radius_a + margin_a)
    have = box * pixel
    if needed > have:
        shift = f" plus {margin_a:.0f} A of shifts on each side" if margin_a > 0 else ""
        raise InputError(
            "--box",
            f"{what} is {2 * radius_a:.0f} A across ({source}){shift}, but the box is only "
            f"{box} x {pixel:g} = {have:.0f} A: use a box of at least {math.ceil(needed / pixel)} "
            f"px or a pixel size of at least {needed / box:.3g} A",
        )


def load_source_volume(
    source: str | os.PathLike[str],
    box_size: int,
    pixel_size_a: float,
    *,
    margin_a: float = 0.0,
    blur_a2: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> SourceVolume:
    """The density named by `source` ("phantom", an MRC map or a PDB/mmCIF file) on a
    (box, box, box) grid of `pixel_size_a`; InputError if unreadable or if the molecule (plus
    `margin_a`, e.g. the largest shift) does not fit in the box's inscribed sphere."""
    text = str(source)
    if text.lower() == PHANTOM:
        radius = phantom_radius_a(pixel_size_a)
        _check_fits("the built-in phantom, including its soft edge", "the phantom", radius,
                    box_size, pixel_size_a, margin_a)
        volume = phantom_volume(box_size, pixel_size_a, dtype=dtype)
        return SourceVolume(volume, "built-in phantom", radius)
    path = Path(source)
    if not path.exists():
        raise InputError(path, "no such file (expected 'phantom', an MRC map or a PDB/mmCIF file)")
    if path.is_dir():
        raise InputError(path, "is a folder, not a map or atomic model")
    if is_atomic_model(path):
        model = read_atomic_model(path)
        margin = atomic_model_margin_a(pixel_size_a, blur_a2)
        _check_fits(f"{model.n_atoms:,} atoms within {model.radius_a:.0f} A of their centre of "
                    f"mass, plus {margin:.0f} A of blur", "the model", model.radius_a + margin,
                    box_size, pixel_size_a, margin_a)
        volume = atomic_model_volume(model, box_size, pixel_size_a, blur_a2=blur_a2, dtype=dtype)
        return SourceVolume(
            volume, f"atomic model {path.name} ({model.n_atoms:,} atoms)", model.radius_a + margin
        )
    if path.suffix.lower() in MAP_SUFFIXES:
        return map_source_volume(path, box_size, pixel_size_a, margin_a=margin_a, dtype=dtype)
    raise InputError(
        path,
        f"unknown file type {path.suffix!r}: expected 'phantom', an MRC map "
        f"({', '.join(MAP_SUFFIXES)}) or an atomic model (.pdb, .cif)",
    )


def map_radius_a(volume: Tensor, voxel_size_a: float) -> float:
    """Radius (A) about the centre voxel `M // 2` holding `MASS_FRACTION` of the mass of the
    voxels above `THRESHOLD_FRACTION` of the maximum (0 for a map with no positive values)."""
    v = volume.to(torch.float64)
    top = float(v.max())
    if not top > 0:
        return 0.0
    z, y, x = fft3_grid(v.shape[-1], dtype=torch.float64)
    keep = v > THRESHOLD_FRACTION * top
    radius = torch.sqrt(x * x + y * y + z * z)[keep]
    mass = v[keep]
    order = torch.argsort(radius)
    cumulative = torch.cumsum(mass[order], 0)
    index = int(torch.searchsorted(cumulative, MASS_FRACTION * float(cumulative[-1])))
    return float(radius[order][min(index, radius.numel() - 1)]) * voxel_size_a


def exact_scale_size(size: int, ratio: float) -> tuple[int, int]:
    """(M', M'') with M' >= size and M'' = round(M' * ratio) within SCALE_TOLERANCE (relative)
    of M' * ratio; the best found up to size + MAX_PAD_SEARCH otherwise."""
    best = (size, max(1, round(size * ratio)))
    best_error = math.inf
    for m in range(size, size + MAX_PAD_SEARCH + 1):
        target = max(1, round(m * ratio))
        error = abs(target / (m * ratio) - 1)
        if error < best_error:
            best, best_error = (m, target), error
        if error <= SCALE_TOLERANCE:
            break
    return best


def _centre_crop(volume: Tensor, size: int) -> Tensor:
    n = volume.shape[-1]
    start = n // 2 - size // 2
    return volume[start : start + size, start : start + size, start : start + size]


def map_source_volume(
    path: Path,
    box_size: int,
    pixel_size_a: float,
    *,
    margin_a: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> SourceVolume:
    """An MRC map resampled to the requested pixel size and box (see the module docstring)."""
    from cryostoch.io.mrc import check_map, read_map

    volume, voxel = read_map(path)
    check_map(path, volume)  # cubic, finite, not constant: as fsc and --init
    m = volume.shape[-1]
    if not (math.isfinite(voxel) and voxel > 0):
        raise InputError(path, "the header sets no voxel size, so the map cannot be scaled")
    radius = map_radius_a(volume, voxel)
    if radius == 0.0:
        raise InputError(path, "the map has no positive density")
    _check_fits(f"{MASS_FRACTION:.1%} of its density within {radius:.0f} A of the map's centre",
                "the map's molecule", radius, box_size, pixel_size_a, margin_a)
    # Crop away what cannot be in the output box (keeps the FFTs small), then scale exactly.
    keep = min(m, math.ceil(box_size * pixel_size_a / voxel) + 4)
    volume = _centre_crop(volume, keep).to(torch.float64)
    ratio = voxel / pixel_size_a
    padded, scaled = exact_scale_size(volume.shape[-1], ratio)
    if padded > volume.shape[-1]:
        volume = pad_real_space(volume, padded, ndim=3)
    if scaled != padded:
        volume = resample_volume(volume, scaled)
    if scaled >= box_size:
        volume = _centre_crop(volume, box_size)
    else:
        volume = pad_real_space(volume, box_size, ndim=3)
    effective = voxel * padded / scaled
    note = "" if abs(effective / pixel_size_a - 1) < 1e-6 else f", scaled to {effective:.6g} A"
    return SourceVolume(
        volume.contiguous().to(dtype),
        f"map {path.name} ({m}^3 at {voxel:g} A{note})",
        radius,
    )


__all__ = [
    "PHANTOM",
    "SourceVolume",
    "exact_scale_size",
    "load_source_volume",
    "map_radius_a",
    "map_source_volume",
]
