"""A simulated particle data set on disk: configuration in, files out (no argparse).

`simulate_dataset(config)` writes into `config.out_dir`:

- `particles.mrcs`: the images (float32 or float16), generated and written chunk by chunk;
- `particles.star`: RELION 3.1 (`data_optics` + `data_particles`) with each particle's CTF
  and its ground-truth pose (rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst = -shift * pixel);
- `ground_truth.mrc`: the density the images were made from (scaled to the images' units:
  noise sigma 1), with its voxel size;
- `montage.png`: a few particles next to their noise-free images and bare projections;
- `simulation.json`: the configuration, the density scale, the realised SNR, the noise
  (white, or the coloured spectrum at the shells), the junk counts and the contrast spread.

Real-data hazards (off by default; `cryostoch.simulate.noise`, `cryostoch.simulate.hazards`):
coloured noise, junk images (truth column `rlnCryostochJunk`) and per-particle contrast
(`rlnCryostochScale`). With none of them the output is what it was without them.

See `cryostoch.simulate.particles` for the forward model, the SNR definition and the random
streams. Every file appears atomically (temporary name, then rename) and `particles.star`, which
names the others, comes last; if anything fails, every file this run wrote is removed, so
nothing that looks complete is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryostoch.errors import InputError
from cryostoch.io._common import atomic_path, default_file_mode
from cryostoch.simulate.ctf import CtfSampler, CtfTable, DefaultCtf
from cryostoch.simulate.hazards import (
    Hazards,
    check_hazard_options,
    draw_hazards,
    hazard_summary,
    montage_labels,
    star_columns,
)
from cryostoch.simulate.montage import montage_figure as _montage
from cryostoch.simulate.montage import write_montage
from cryostoch.simulate.noise import (
    SpectrumTable,
    noise_amplitude,
    noise_summary,
    resolve_spectrum,
)
from cryostoch.simulate.particles import (
    SHIFT_TRUNCATION,
    ParticleParameters,
    ProjectionModel,
    draw_particle_parameters,
    mean_signal_variance,
)
from cryostoch.simulate.stream import write_particle_stack
from cryostoch.simulate.volumes import load_source_volume

log = logging.getLogger(__name__)

STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
GROUND_TRUTH_NAME = "ground_truth.mrc"
MONTAGE_NAME = "montage.png"
SUMMARY_NAME = "simulation.json"
OUTPUT_NAMES = (STAR_NAME, STACK_NAME, GROUND_TRUTH_NAME, MONTAGE_NAME, SUMMARY_NAME)
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulated data set. Bad values raise InputError naming the
    command-line option."""

    source: str
    n_particles: int
    box_size: int
    pixel_size_a: float
    out_dir: str
    ctf_table: str | None = None
    snr: float = 0.05
    shift_sigma_a: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    chunk_size: int = 64
    pilot_size: int = 1000
    volume_oversampling: int = 2
    compute_dtype: str = "float32"
    device: str = "cpu"
    n_montage: int = 6
    overwrite: bool = False
    noise_spectrum: str | None = None  # two-column file: frequency 1/A, relative power
    noise_from: str | None = None  # real particles whose background spectrum to copy
    noise_particle_diameter_a: float | None = None  # their particle diameter (mask)
    junk_fraction: float = 0.0
    contrast_sigma: float = 0.0

    def __post_init__(self) -> None:
        def positive_int(value, option):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise InputError(option, f"must be a positive integer, got {value!r}")

        def positive(value, option):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(option, f"must be a positive number, got {value!r}")

        positive_int(self.n_particles, "--n-particles")
        positive_int(self.box_size, "--box")
        if self.box_size < 16 or self.box_size % 2:
            raise InputError("--box", f"must be an even number >= 16, got {self.box_size}")
        positive(self.pixel_size_a, "--pixel-size-a")
        positive(self.snr, "--snr")
        if not (math.isfinite(self.shift_sigma_a) and self.shift_sigma_a >= 0):
            raise InputError("--shift-sigma-a", f"must be >= 0, got {self.shift_sigma_a!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise InputError("--seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise InputError("--dtype", f"must be float32 or float16, got {self.dtype!r}")
        positive_int(self.chunk_size, "--chunk-size")
        positive_int(self.pilot_size, "--pilot-size")
        positive_int(self.volume_oversampling, "--volume-oversampling")
        if self.compute_dtype not in ("float32", "float64"):
            raise InputError("--compute-dtype",
                             f"must be float32 or float64, got {self.compute_dtype!r}")
        if self.n_montage < 0:
            raise InputError("--montage", f"must be >= 0, got {self.n_montage!r}")
        if self.noise_spectrum is not None and self.noise_from is not None:
            raise InputError("--noise-from", "give --noise-spectrum or --noise-from, not both")
        if self.noise_particle_diameter_a is not None:
            positive(self.noise_particle_diameter_a, "--noise-particle-diameter-a")
        check_hazard_options(self.junk_fraction, self.contrast_sigma)

    @property
    def shift_sigma_px(self) -> float:
        return self.shift_sigma_a / self.pixel_size_a


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    star_path: Path
    stack_path: Path
    ground_truth_path: Path
    montage_path: Path | None
    n_particles: int
    density_scale: float  # ground truth = scale * source density
    pilot_signal_variance: float  # mean image variance of the unscaled density (pilot)
    realised_snr: float  # mean Var(noise-free) / mean Var(noise), over all images
    seconds: float


def ctf_sampler_for(config: SimulationConfig) -> CtfSampler:
    return DefaultCtf() if config.ctf_table is None else CtfTable.read(config.ctf_table)


def _check_out_dir(config: SimulationConfig) -> list[str]:
    """The outputs of an earlier run in the folder; InputError unless overwriting."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not config.overwrite:
        raise InputError(
            out, f"already holds a simulation ({', '.join(existing)}): use --overwrite or "
            "another --out",
        )
    return existing


def _prepare_out_dir(config: SimulationConfig) -> Path:
    out = Path(config.out_dir)
    existing = _check_out_dir(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create the folder ({err.strerror or err})") from None
    # The STAR file names the rest: remove it first so a failed rerun leaves nothing that
    # looks complete.
    for name in existing:
        (out / name).unlink()
    # hidden temporaries (`atomic_path`, the stack writer) of a killed simulation
    for name in OUTPUT_NAMES:
        for stale in out.glob(f".{name}.*.partial"):
            stale.unlink(missing_ok=True)
    return out


def _default_permissions(path: Path) -> None:
    """Give a file made by mkstemp (mode 0600) the permissions a plain open() would."""
    os.chmod(path, default_file_mode())


def _atomic(path: Path):
    return atomic_path(path)


def relion_tables(params: ParticleParameters, sampler: CtfSampler, box: int,
                  pixel_size_a: float, stack_name: str = STACK_NAME
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) DataFrames of a RELION 3.1 particle file for these particles."""
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(sampler.optics))],
        "rlnOpticsGroup": np.arange(1, len(sampler.optics) + 1),
        "rlnVoltage": [o.voltage_kv for o in sampler.optics],
        "rlnSphericalAberration": [o.spherical_aberration_mm for o in sampler.optics],
        "rlnAmplitudeContrast": [o.amplitude_contrast for o in sampler.optics],
        "rlnImagePixelSize": pixel_size_a,
        "rlnImageSize": box,
        "rlnImageDimensionality": 2,
    })
    n = len(params)
    ctf = params.ctf
    euler = params.euler_deg.numpy()
    shifts = params.shifts_px.numpy()
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnOpticsGroup": params.optics_index + 1,
        "rlnDefocusU": ctf.defocus_u_a.numpy(),
        "rlnDefocusV": ctf.defocus_v_a.numpy(),
        "rlnDefocusAngle": ctf.defocus_angle_deg.numpy(),
        "rlnPhaseShift": ctf.phase_shift_deg.numpy(),
        "rlnCtfBfactor": ctf.bfactor_a2.numpy(),
        "rlnCtfScalefactor": ctf.scale.numpy(),
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        # RELION's origin recentres the particle: origin = -t (docs/conventions.md)
        "rlnOriginXAngst": -shifts[:, 0] * pixel_size_a,
        "rlnOriginYAngst": -shifts[:, 1] * pixel_size_a,
    })
    return optics, particles


SNR_DEFINITION = "mean over images of Var(noise-free image over the whole box) / noise variance"


def _device_for(config: SimulationConfig) -> torch.device:
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise InputError("--device", f"unknown device {config.device!r}: use cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was requested but torch sees no GPU")
    return device


def _density(config: SimulationConfig, volume: torch.Tensor | None
             ) -> tuple[torch.Tensor, str]:
    """The (N, N, N) float64 density to simulate from and its description."""
    box, pixel = config.box_size, config.pixel_size_a
    if volume is None:
        shift_margin_a = SHIFT_TRUNCATION * config.shift_sigma_a
        source = load_source_volume(config.source, box, pixel, margin_a=shift_margin_a)
        return source.volume, source.description
    if tuple(volume.shape) != (box, box, box):
        raise ValueError(f"volume must be ({box},)*3, got {tuple(volume.shape)}")
    return volume.detach().to(torch.float64), "given volume"


def _scale_to_snr(model: ProjectionModel, pilot: ParticleParameters, config: SimulationConfig
                  ) -> tuple[float, float]:
    """Scale the model so that the pilot images have the requested SNR at noise sigma 1.

    Returns (the pilot's mean signal variance before scaling, the scale applied).
    """
    pilot_variance = mean_signal_variance(model, pilot, config.chunk_size)
    if not (math.isfinite(pilot_variance) and pilot_variance > 0):
        raise InputError(config.source, "the density projects to blank images (is it empty?)")
    scale = math.sqrt(config.snr / pilot_variance)
    model.scale_(scale)
    return pilot_variance, scale


def _noise_spectrum(config: SimulationConfig) -> tuple[SpectrumTable | None, torch.Tensor | None]:
    """The coloured noise's table and its (N, N//2+1) amplitude; (None, None) for white."""
    spectrum = resolve_spectrum(config.noise_spectrum, config.noise_from,
                                config.noise_particle_diameter_a)
    if spectrum is None:
        return None, None
    return spectrum, noise_amplitude(spectrum, config.box_size, config.pixel_size_a)


def _write_star(path: Path, params: ParticleParameters, hazards: Hazards, sampler: CtfSampler,
                config: SimulationConfig) -> None:
    """particles.star: RELION 3.1 tables plus the hazards' truth columns (if any)."""
    from cryostoch.io.star import write_particles_star

    optics, particles = relion_tables(params, sampler, config.box_size, config.pixel_size_a)
    particles = particles.assign(**star_columns(hazards, config.junk_fraction,
                                                config.contrast_sigma))
    write_particles_star(path, optics, particles)


def _summary(config: SimulationConfig, description: str, sampler: CtfSampler, *, scale: float,
             pilot: int, pilot_variance: float, realised_snr: float, seconds: float,
             spectrum, hazards: Hazards, signal_by_kind: np.ndarray) -> dict:
    """What simulation.json records."""
    box, pixel = config.box_size, config.pixel_size_a
    return {
        "config": asdict(config),
        "source": description,
        "ctf": sampler.description,
        "noise_sigma": 1.0,
        "density_scale": scale,
        "pilot_particles": pilot,
        "pilot_signal_variance": pilot_variance,
        "requested_snr": config.snr,
        "realised_snr": realised_snr,
        "snr_definition": SNR_DEFINITION,
        "seconds": seconds,
        "noise": noise_summary(spectrum, box, pixel),
        **hazard_summary(hazards, config.junk_fraction, config.contrast_sigma, signal_by_kind),
    }


def simulate_dataset(
    config: SimulationConfig,
    *,
    volume: torch.Tensor | None = None,
    progress: bool | None = None,
) -> SimulationResult:
    """Simulate and write a data set (see the module docstring).

    `volume` (optional) replaces `config.source` as the density (on the requested grid).
    `progress`: a tqdm bar on stderr (None: only when stderr is a terminal).
    """
    from cryostoch.io.mrc import write_map

    start_time = time.perf_counter()
    device = _device_for(config)
    compute = getattr(torch, config.compute_dtype)
    n, box, pixel = config.n_particles, config.box_size, config.pixel_size_a
    _check_out_dir(config)
    sampler = ctf_sampler_for(config)
    density, description = _density(config, volume)
    spectrum, amplitude = _noise_spectrum(config)

    params = draw_particle_parameters(n, sampler, seed=config.seed,
                                      shift_sigma_px=config.shift_sigma_px)
    hazards = draw_hazards(n, seed=config.seed, junk_fraction=config.junk_fraction,
                           contrast_sigma=config.contrast_sigma)
    model = ProjectionModel(density.to(device=device, dtype=compute), pixel,
                            oversampling=config.volume_oversampling)
    pilot = params.index(slice(0, min(n, config.pilot_size)))
    pilot_variance, scale = _scale_to_snr(model, pilot, config)

    existed = Path(config.out_dir).exists()
    out = _prepare_out_dir(config)  # only now: every check above leaves no folder behind
    created: list[Path] = []
    stack_path, star_path, gt_path = out / STACK_NAME, out / STAR_NAME, out / GROUND_TRUTH_NAME
    montage_path, summary_path = out / MONTAGE_NAME, out / SUMMARY_NAME
    montage_k = min(config.n_montage, n)
    try:
        realised_snr, montage, signal_by_kind = write_particle_stack(
            stack_path, model, params, hazards, amplitude, config, montage_k, progress)
        created.append(stack_path)

        write_map(gt_path, (density * scale).to(torch.float32), pixel)
        created.append(gt_path)

        if montage_k:
            _montage(montage_path, model, params.index(slice(0, montage_k)), montage,
                     f"{description}; SNR {config.snr:g}; box {box} x {pixel:g} A",
                     montage_labels(hazards, montage_k, config.junk_fraction))
            created.append(montage_path)

        seconds = time.perf_counter() - start_time
        summary = _summary(config, description, sampler, scale=scale, pilot=len(pilot),
                           pilot_variance=pilot_variance, realised_snr=realised_snr,
                           seconds=seconds, spectrum=spectrum, hazards=hazards,
                           signal_by_kind=signal_by_kind)
        with _atomic(summary_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        created.append(summary_path)

        _write_star(star_path, params, hazards, sampler, config)
        created.append(star_path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):  # only if empty
                out.rmdir()
        raise
    log.info("simulated %d particles in %.1f s; realised SNR %.4g", n, seconds, realised_snr)
    return SimulationResult(
        out_dir=out, star_path=star_path, stack_path=stack_path, ground_truth_path=gt_path,
        montage_path=montage_path if montage_k else None, n_particles=n, density_scale=scale,
        pilot_signal_variance=pilot_variance, realised_snr=realised_snr, seconds=seconds,
    )


__all__ = [
    "DTYPES",
    "GROUND_TRUTH_NAME",
    "MONTAGE_NAME",
    "OUTPUT_NAMES",
    "STACK_NAME",
    "STAR_NAME",
    "SUMMARY_NAME",
    "SimulationConfig",
    "SimulationResult",
    "ctf_sampler_for",
    "relion_tables",
    "simulate_dataset",
    "write_montage",
]
