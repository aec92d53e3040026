"""Checks of a run against its data, made before any image is preprocessed or any large
array allocated: each fails with one line naming the option or file, so that nothing is
spent on a run that cannot work (or could only write its random start).

- `check_work`: a training set and at least one image of work (`--epochs`, `--test-size`);
- `check_cutoff`: a cutoff with a margin to Nyquist (called by `working_geometry`);
- `check_shift_range`: a shift search that keeps the particle inside the box;
- `check_memory`: the peak memory of the likelihood's operators, estimated from the sizes of
  the quadrature and the cutoff, against what the machine (or GPU) has free;
- `read_init_map`: a `--init` map that is a cubic, finite, non-constant map of the particles'
  physical box, resampled to the working box.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.schedule import run_epochs
from cryostoch.errors import InputError
from cryostoch.fourier.grids import half_plane_coefficients
from cryostoch.fourier.resample import resample_volume
from cryostoch.geometry.quadrature import (
    DIRECTION_DENSITY_FACTOR,
    angular_step_rad,
    default_shift_step_px,
    shift_quadrature,
)
from cryostoch.geometry.symmetry import point_group
from cryostoch.io.cache import check_cache_dir
from cryostoch.io.mrc import check_map, read_map

if TYPE_CHECKING:  # prepare.py calls `check_before_work`
    from cryostoch.engine.prepare import WorkingGeometry
    from cryostoch.io.dataset import ParticleDataset

log = logging.getLogger(__name__)

# Physical extents (box x voxel size) that differ by less than this count as the same.
EXTENT_RTOL = 0.01
# Share of the free memory a run may plan to use (the rest: Python, torch, other buffers).
MEMORY_FRACTION = 0.8


def check_work(config: ReconstructionConfig, n_particles: int) -> None:
    """InputError unless the selected particles leave a training set and the run takes at
    least one image of work (`Schedule.total_images` rounds epochs x training images)."""
    n_train = n_particles - config.test_size
    if n_train < 1:
        raise InputError("--test-size", f"{config.test_size} held-out images leave none for "
                         f"training (the selection has {n_particles} particles)")
    epochs = run_epochs(config, n_train)
    if round(epochs * n_train) < 1:
        raise InputError("--epochs", f"{epochs:g} epochs of {n_train} training images is less "
                         "than one image: the run would only write its random start")


def check_cutoff(radius_px: float, box: int, pixel_size_a: float, option: str) -> None:
    """InputError naming `option` if the cutoff leaves no margin to Nyquist (the operators
    read 3 pixels out)."""
    if radius_px > box / 2 - 3:
        raise InputError(option, f"a cutoff of {radius_px:.1f} Fourier pixels "
                         f"({box * pixel_size_a / radius_px:.3g} A) is too close to Nyquist "
                         f"({2 * pixel_size_a:.3g} A) for the working box of {box} (at most "
                         f"{box / 2 - 3:g} pixels): use a coarser {option}")


def check_shift_range(shift_range_a: float, box: int, pixel_size_a: float) -> None:
    """InputError if the shift disc reaches the edge of the working box."""
    half_box_a = box * pixel_size_a / 2
    if shift_range_a >= half_box_a:
        raise InputError("--shift-range-a", f"{shift_range_a:g} A reaches past the edge "
                         f"of the box ({box} x {pixel_size_a:.3g} A: at most {half_box_a:.4g} "
                         "A from the centre)")


def quadrature_sizes(config: ReconstructionConfig, box: int, pixel_size_a: float,
                     radius_px: float, shift_range_a: float) -> dict[str, int]:
    """Directions (all classes), in-plane angles, shifts and Fourier coefficients of the
    likelihood at `radius_px`, counted without building the operators."""
    step = angular_step_rad(radius_px)
    directions = math.ceil((DIRECTION_DENSITY_FACTOR / step) ** 2)
    directions = math.ceil(directions / point_group(config.symmetry).order)
    shifts = shift_quadrature(shift_range_a / pixel_size_a,
                              default_shift_step_px(box, radius_px),
                              config.shift_sigma_px(shift_range_a, pixel_size_a)
                              ).shifts_px.shape[0]
    return {"directions": directions * config.classes,
            "inplane": math.ceil(2 * math.pi / step), "shifts": int(shifts),
            "coefficients": int(half_plane_coefficients(box, radius_px).n_points)}


def estimate_peak_bytes(config: ReconstructionConfig, box: int, pixel_size_a: float,
                        radius_px: float, shift_range_a: float, n_particles: int) -> int:
    """Peak memory of a run's largest arrays, in bytes (an estimate within about 2x).

    The image side's interpolation matrix (16 taps per rotated point, built in COO then
    coalesced: ~3 copies of int64 pairs and float64 values) and its shift phases; the volume
    side's trilinear stencil; the slices of every direction (with their gradient); and the
    preprocessed image blocks of every particle. Calibrated against the peak RSS of runs at
    box 64 (cutoffs 0.3 and 0.5 of Nyquist, with and without shifts).
    """
    s = quadrature_sizes(config, box, pixel_size_a, radius_px, shift_range_a)
    real = 8 if config.dtype == "float64" else 4
    m, p, d, t = s["coefficients"], s["inplane"], s["directions"], s["shifts"]
    image_side = p * m * (16 * 24 * 3 + 16) + p * t * m * 2 * real
    volume_side = d * m * (8 * (8 + real + 1) + 48) + 3 * d * m * 2 * real
    h = math.ceil((radius_px + 2.5 / config.image_oversampling) * config.image_oversampling)
    # with --cache-dir the blocks stay on disk: a minibatch or chunk at a time in memory
    blocks = 0 if config.cache_dir else n_particles * (2 * h + 1) * (h + 1) * 2 * real
    # the posterior kernel holds a few temporaries of the memory budget at once (measured)
    return int(image_side + volume_side + blocks + 4 * config.memory_budget_mb * 2**20)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (MemAvailable on a Linux CPU), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def refuse_if_short(option: str, needed_bytes: int, device: torch.device, change: str) -> None:
    """InputError naming `option` if `needed_bytes` exceeds what the device has free; says
    how much and what to `change`."""
    free = available_bytes(device)
    log.debug("estimated peak memory %.2f GB (free: %s)", needed_bytes / 1e9, free)
    if free is None or needed_bytes <= MEMORY_FRACTION * free:
        return
    raise InputError(option, f"this would need about {needed_bytes / 1e9:.1f} GB of memory, "
                     f"more than the {free / 1e9:.1f} GB free: {change}")


def check_memory(config: ReconstructionConfig, box: int, pixel_size_a: float,
                 radius_px: float, shift_range_a: float, n_particles: int) -> None:
    """InputError, before anything large is allocated, if the run would need more memory
    than the device has free."""
    option = config.cutoff_option
    needed = estimate_peak_bytes(config, box, pixel_size_a, radius_px, shift_range_a,
                                 n_particles)
    refuse_if_short(option, needed, torch.device(config.device),
                    f"use a coarser cutoff ({option}), a smaller working box (--box), a "
                    "narrower --shift-range-a, fewer particles or --cache-dir (the "
                    "preprocessed particles on disk)")


def read_init_map(path: str | Path, data_box: int, data_pixel_a: float, working_box: int,
                  *, hint: str = "--init takes 'random' or an MRC map") -> Tensor:
    """(N, N, N) float64 map (an --init map, a map to score) on the working box; InputError
    (naming the file) unless it is a cubic, finite, non-constant map spanning the particles'
    box."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"no such map ({hint})")
    volume, voxel_a = read_map(path)
    check_map(path, volume)
    extent_a, data_extent_a = volume.shape[-1] * voxel_a, data_box * data_pixel_a
    if voxel_a > 0 and abs(extent_a - data_extent_a) > EXTENT_RTOL * data_extent_a:
        raise InputError(path, f"spans {volume.shape[-1]} x {voxel_a:.4g} = {extent_a:.4g} A "
                         f"but the particles' box spans {data_box} x {data_pixel_a:.4g} = "
                         f"{data_extent_a:.4g} A: resample or pad it to match first")
    if voxel_a <= 0:
        log.warning("%s sets no voxel size: assumed to span the particles' box", path)
    volume = volume.to(torch.float64)
    return resample_volume(volume, working_box) if volume.shape[-1] != working_box else volume


def check_before_work(config: ReconstructionConfig, dataset: ParticleDataset,
                      geometry: WorkingGeometry) -> None:
    """Every check above, for the selected particles and the working geometry."""
    check_work(config, len(dataset))
    check_shift_range(geometry.shift_range_a, geometry.box_size, geometry.pixel_size_a)
    if config.init != "random":
        read_init_map(config.init, dataset.box_size, dataset.pixel_size_a, geometry.box_size)
    check_memory(config, geometry.box_size, geometry.pixel_size_a, geometry.cutoff_radius_px,
                 geometry.shift_range_a, len(dataset))
    if config.cache_dir is not None:
        check_cache_dir(config.cache_dir)
