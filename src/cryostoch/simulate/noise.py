"""Coloured noise for simulated particles: a radial power spectrum from a file or real data.

A spectrum is a table of relative noise power against spatial frequency (1/A). It is read
from a two-column text/CSV file (`read_spectrum_file`) or measured on the background of real
particles (`spectrum_from_particles`: the same masked shell power the reconstruction's
coloured-noise model starts from, `cryostoch.model.noise`). `noise_amplitude` interpolates it
(linearly, constant beyond the table's ends) onto the radial frequency |k| / (N p) of every
`rfft2c` coefficient of the simulated box and normalises it so that its mean over the whole
(full-plane) spectrum is 1: by Parseval the mean real-space noise variance then stays 1, the
unit the SNR is defined in. `colour_noise` turns the per-particle white noise (the same
seeded draws as without a spectrum) into coloured noise: rfft2c, times sqrt(spectrum),
irfft2c, so the noise stays real and each particle's noise still depends only on its seed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.fourier.grids import fft2_grid, rfft2_grid
from cryostoch.fourier.transforms import irfft2c, rfft2c

log = logging.getLogger(__name__)

SPECTRUM_SAMPLE = 500  # real particles read for --noise-from
READ_CHUNK = 100  # images read at a time
DEFAULT_DIAMETER_FRACTION = 0.8  # particle diameter / box, like `cryostoch reconstruct`


@dataclass(frozen=True)
class SpectrumTable:
    """Relative noise power `power` (K,) at spatial frequencies `frequency_per_a` (K,),
    strictly increasing, >= 0; `source` says where it came from."""

    frequency_per_a: np.ndarray
    power: np.ndarray
    source: str

    def at(self, frequency_per_a: np.ndarray) -> np.ndarray:
        """Linear interpolation, constant beyond the ends (same shape as the input)."""
        return np.interp(frequency_per_a, self.frequency_per_a, self.power)


def _check_table(frequency: np.ndarray, power: np.ndarray, source: str) -> None:
    if frequency.size < 2:
        raise InputError(source, f"needs at least 2 rows (frequency, power), got {frequency.size}")
    if not (np.isfinite(frequency).all() and np.isfinite(power).all()):
        raise InputError(source, "has non-finite values")
    if (frequency < 0).any() or (np.diff(frequency) <= 0).any():
        raise InputError(source, "frequencies (column 1, 1/A) must be >= 0 and strictly "
                         "increasing")
    if (power < 0).any() or not (power > 0).any():
        raise InputError(source, "noise powers (column 2) must be >= 0 and not all zero")


def read_spectrum_file(path: str | os.PathLike[str]) -> SpectrumTable:
    """Read a two-column table: frequency in 1/A, relative noise power.

    Separators: commas and/or whitespace; blank lines and lines starting with '#' are
    skipped, and so is a first line that is not numeric (a header). Extra columns are an
    error. Raises InputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file" if not path.exists() else "is not a file")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read the noise spectrum ({err})") from None
    rows: list[tuple[float, float]] = []
    first = True
    for number, line in enumerate(lines, start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        header, first = first, False
        try:
            values = [float(f) for f in fields]
        except ValueError:
            if header:
                continue
            raise InputError(path, f"line {number}: not two numbers: {line.strip()[:40]!r}"
                             ) from None
        if len(values) != 2:
            raise InputError(path, f"line {number}: expected 2 columns (frequency 1/A, power), "
                             f"got {len(values)}")
        rows.append((values[0], values[1]))
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    _check_table(table[:, 0], table[:, 1], str(path))
    return SpectrumTable(table[:, 0], table[:, 1], f"file {path}")


def _sample_rows(n: int, count: int) -> np.ndarray:
    """(min(n, count),) evenly spaced row indices, increasing."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def spectrum_from_particles(path: str | os.PathLike[str], *, sample_size: int = SPECTRUM_SAMPLE,
                            diameter_a: float | None = None) -> SpectrumTable:
    """The shell-averaged background power spectrum of real particles.

    Reads `sample_size` evenly spaced images, subtracts each one's background mean (the
    spectrum is relative, so no global scale is needed), keeps the background beyond the
    particle radius with `soft_background_mask` and measures the power per Fourier shell with
    `background_power` / `spectrum_from_background` (corrected for the area the mask keeps,
    smoothed over neighbouring shells). `diameter_a`: the particle diameter in A (default 80%
    of the box). Shell s is at frequency s / (N p) 1/A.
    """
    from cryostoch.io.dataset import open_particles
    from cryostoch.model.noise import (
        background_power,
        soft_background_mask,
        spectrum_from_background,
    )
    from cryostoch.model.preprocess import normalise_images

    dataset = open_particles(path)
    box, pixel = dataset.box_size, dataset.pixel_size_a
    diameter_px = DEFAULT_DIAMETER_FRACTION * box if diameter_a is None else diameter_a / pixel
    radius_px = min(0.5 * diameter_px, box / 2 - 2)
    if not (diameter_px > 0 and radius_px < box / 2 - 4):
        raise InputError("--noise-particle-diameter-a", f"a particle {diameter_px * pixel:.0f} A "
                         f"across leaves no background in the {box * pixel:.0f} A box")
    mask = soft_background_mask(box, radius_px)
    rows = _sample_rows(len(dataset), sample_size)
    power_sum = torch.zeros(1, box // 2 + 1, dtype=torch.float64)
    for start in range(0, rows.size, READ_CHUNK):
        images = dataset.read_images(rows[start:start + READ_CHUNK]).to(torch.float64)
        if not torch.isfinite(images).all():
            raise InputError(path, "images contain NaN or infinite values")
        normalised = normalise_images(images, radius_px, 1.0, 1)
        power, counts = background_power(normalised, mask)
        power_sum += power.sum(dim=0, keepdim=True)
    n_images = torch.tensor([float(rows.size)], dtype=torch.float64)
    spectrum = spectrum_from_background(power_sum, counts, n_images, mask)[0].numpy()
    frequency = np.arange(box // 2 + 1) / (box * pixel)
    _check_table(frequency, spectrum, str(path))
    return SpectrumTable(frequency, spectrum,
                         f"background of {rows.size} particles of {path} (box {box}, "
                         f"{pixel:g} A/px, mask radius {radius_px:.1f} px)")


def _full_plane_mean(table: SpectrumTable, box_size: int, pixel_size_a: float) -> float:
    """Mean of the table's power over the full N x N centred spectrum (> 0, else InputError)."""
    ky, kx = fft2_grid(box_size)
    mean = float(table.at((torch.sqrt(kx * kx + ky * ky) / (box_size * pixel_size_a)).numpy())
                 .mean())
    if not (math.isfinite(mean) and mean > 0):
        raise InputError(table.source, "the noise spectrum is zero on this box's frequencies")
    return mean


def noise_amplitude(table: SpectrumTable, box_size: int, pixel_size_a: float) -> Tensor:
    """(N, N//2+1) float64 sqrt(relative power) at every `rfft2c` coefficient, normalised
    so that the power's mean over the full N x N spectrum is 1 (real-space variance 1)."""
    mean = _full_plane_mean(table, box_size, pixel_size_a)
    hy, hx = rfft2_grid(box_size)
    half = table.at((torch.sqrt(hx * hx + hy * hy) / (box_size * pixel_size_a)).numpy())
    nyquist = 0.5 / pixel_size_a
    if table.frequency_per_a[-1] < nyquist * (1 - 1e-6):
        log.warning("noise spectrum ends at %.4g 1/A, below the simulated Nyquist %.4g 1/A: its "
                    "last value is used beyond", table.frequency_per_a[-1], nyquist)
    return torch.from_numpy(np.sqrt(half / mean))


def colour_noise(white: Tensor, amplitude: Tensor | None) -> Tensor:
    """white (B, N, N) real noise -> (B, N, N): its `rfft2c` times amplitude (N, N//2+1),
    back by `irfft2c`, computed in float64 on the CPU and returned in white's dtype and
    device. amplitude None: white itself, unchanged."""
    if amplitude is None:
        return white
    n = white.shape[-1]
    spectrum = rfft2c(white.detach().to("cpu", torch.float64)) * amplitude
    return irfft2c(spectrum, n).to(device=white.device, dtype=white.dtype)


def resolve_spectrum(noise_spectrum: str | None, noise_from: str | None,
                     diameter_a: float | None = None) -> SpectrumTable | None:
    """The table of `--noise-spectrum FILE` or `--noise-from PARTICLES`, None for white."""
    if noise_spectrum is not None:
        return read_spectrum_file(noise_spectrum)
    if noise_from is not None:
        return spectrum_from_particles(noise_from, diameter_a=diameter_a)
    return None


def noise_summary(table: SpectrumTable | None, box_size: int, pixel_size_a: float) -> dict:
    """simulation.json's record of the noise: white, or the normalised spectrum at the shells
    s = 0 .. N/2 (frequency s / (N p) 1/A)."""
    if table is None:
        return {"kind": "white", "sigma": 1.0}
    mean = _full_plane_mean(table, box_size, pixel_size_a)
    frequency = np.arange(box_size // 2 + 1) / (box_size * pixel_size_a)
    return {"kind": "coloured", "source": table.source, "mean_variance": 1.0,
            "frequency_per_a": frequency.tolist(),
            "relative_power": (table.at(frequency) / mean).tolist()}


__all__ = [
    "SpectrumTable",
    "colour_noise",
    "noise_amplitude",
    "noise_summary",
    "read_spectrum_file",
    "resolve_spectrum",
    "spectrum_from_particles",
]
