"""What gold-standard refinement starts from: its settings, the particles' full-resolution
spectra, the half-set split and each particle's first pose.

The first poses come from the exhaustive search (`likelihood.py`) at the start map's
resolution, which is cheap there (radius ~6 Fourier pixels): the coarse stage of a
coarse-to-fine search whose fine stages are local (`model/local_search.py`). Or, with
`poses_from_input`, from the particles file itself (e.g. the `poses.star` an ab initio run
wrote), as RELION does for a local refinement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from cryostoch.engine.checks import read_init_map
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.initial import data_signal_power, model_signal_power
from cryostoch.engine.noise_and_mask import NoiseAndMask
from cryostoch.engine.outputs import assign_poses
from cryostoch.engine.particle_cache import cached_rows, source_fingerprint
from cryostoch.engine.prepare import PreparedRun, make_model
from cryostoch.errors import InputError
from cryostoch.fourier.grids import HalfPlaneCoefficients, half_plane_coefficients
from cryostoch.fourier.resample import soft_low_pass
from cryostoch.fourier.transforms import rfft2c
from cryostoch.geometry.quadrature import angular_step_rad, default_shift_step_px
from cryostoch.geometry.rotations import euler_to_matrix
from cryostoch.geometry.symmetry import point_group
from cryostoch.io.cache import DiskRows
from cryostoch.model.preprocess import normalise_images
from cryostoch.operators.ctf import CtfParameters, evaluate_ctf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    """Settings of `cryostoch refine` (defaults as RELION's auto-refine would choose them)."""

    particles: str
    init_map: str
    out_dir: str
    symmetry: str = "C1"
    initial_resolution_a: float | None = None  # low-pass of the start (None: diameter / 5)
    particle_diameter_a: float | None = None  # None: 80% of the box
    shift_range_a: float | None = None  # of the first, global search (None: 8% of the box)
    max_iterations: int = 12
    poses_from_input: bool = False  # start from the file's poses instead of a global search
    shell_margin: int = 4  # the E-step's cutoff: the FSC 0.143 radius + this many shells
    search_extent: int = 2  # local window: +-this many steps in each rotation and shift axis
    fine_pass: bool = True  # the significant cells sampled again at half the steps
    particle_scale: bool = False  # an amplitude scale per particle, estimated each iteration
    # (RELION's adaptive oversampling) for the M-step and the poses
    global_rounds: int = 6  # global searches (the first, then while the resolution improves)
    global_top_k: int = 20  # poses per particle the later global searches' exhaustive stage
    # keeps for re-scoring at the search cutoff (1: exhaustive only; `engine/refine_search.py`)
    reference_mask: str = "auto"  # the references' mask: "auto" (solvent) or the "sphere"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    invert: bool | None = None
    project_root: str | None = None
    class_file: str | None = None
    keep_classes: tuple[int, ...] = ()
    chunk_size: int = 128
    cache_dir: str | None = None  # the preprocessed particles on disk, reused across runs

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise InputError("--iterations", "must be at least 1")
        if self.initial_resolution_a is not None and not self.initial_resolution_a > 0:
            raise InputError("--initial-resolution-a", "must be positive")
        if self.reference_mask not in ("sphere", "auto"):
            raise InputError("--reference-mask", f"must be sphere or auto, got "
                             f"{self.reference_mask!r}")
        if self.global_rounds < 1:
            raise InputError("--global-searches", "must be at least 1 (the first search)")
        if self.global_top_k < 1:
            raise InputError("--global-top-k", "must be at least 1")
        if self.search_extent < 1:
            raise InputError("--search-extent", "must be at least 1")
        if self.shell_margin < 1:
            raise InputError("--shell-margin", "must be at least 1")
        if self.chunk_size < 1:
            raise InputError("--chunk-size", "must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def search_config(self) -> ReconstructionConfig:
        """The ab initio engine's settings for the global search and the preprocessing."""
        return ReconstructionConfig(
            particles=self.particles, out_dir=self.out_dir, resolution_a=self.initial_resolution_a,
            test_size=0, seed=self.seed, device=self.device, dtype=self.dtype,
            shift_range_a=self.shift_range_a, particle_diameter_a=self.particle_diameter_a,
            invert=self.invert, project_root=self.project_root, symmetry=self.symmetry,
            init=self.init_map, mask="sphere", class_file=self.class_file,
            keep_classes=self.keep_classes, cache_dir=self.cache_dir)


@dataclass
class FullSpectra:
    """Every particle's noise-normalised spectrum at the half-plane points inside radius N/2-1.

    coefficients: (n, M) complex64 on the CPU, or rows on disk (--cache-dir); precision: (G, M)
    relative noise precision per optics group (the background's coloured spectrum);
    optics_index: (n,) long.
    """

    points: HalfPlaneCoefficients
    coefficients: Tensor | DiskRows
    precision: Tensor
    optics_index: Tensor
    ctf: CtfParameters
    pixel_size_a: float

    def ctf_values(self, rows: Tensor, keep: Tensor, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
        """(b, m) CTF of particles `rows` (b,) at the points selected by `keep` (M,) bool."""
        scale = 1.0 / (self.points.box_size * self.pixel_size_a)
        fx = (self.points.kx[keep] * scale).unsqueeze(0).to(device)
        fy = (self.points.ky[keep] * scale).unsqueeze(0).to(device)
        return evaluate_ctf(self.ctf.index(rows).to(device=device), fx, fy).to(dtype)


def normalised_images(run: PreparedRun, images: Tensor) -> Tensor:
    """(b, N, N) float64: images read again, normalised as the run's preprocessing did."""
    stats = run.particles.statistics
    return normalise_images(images.to(torch.float64), run.geometry.particle_radius_px,
                            stats.noise_sigma, stats.contrast_sign)


def full_spectra(run: PreparedRun, chunk_size: int = 500,
                 world: World = ONE_PROCESS) -> FullSpectra:
    """Stream the selected particles once more, normalised as the search's preprocessing was,
    and keep their spectra up to radius N/2 - 1 (bounded memory: one chunk of images), in
    memory or, with --cache-dir, in a file (reused when the particles and settings match)."""
    dataset = run.dataset
    n_box = dataset.box_size
    points = half_plane_coefficients(n_box, n_box / 2 - 1)
    rows_k, cols_k = points.rfft_indices()

    def write_all(write) -> dict:
        done = 0
        for rows, images in dataset.iter_chunks(chunk_size):
            spectra = rfft2c(normalised_images(run, images))  # unitary, as the model's blocks
            write(done, spectra[:, rows_k, cols_k].to(torch.complex64))
            done += len(rows)
        return {}

    if run.config.cache_dir is None:
        coefficients = torch.empty(len(dataset), points.n_points, dtype=torch.complex64)
        write_all(lambda start, chunk: coefficients[start:start + len(chunk)].copy_(chunk))
    else:
        stats = run.particles.statistics
        key = {"source": source_fingerprint(dataset), "radius_px": n_box / 2 - 1,
               "particle_radius_px": run.geometry.particle_radius_px,
               "noise_sigma": stats.noise_sigma, "contrast_sign": stats.contrast_sign}
        coefficients, _ = cached_rows(run.config.cache_dir, "spectra", key,
                                      (len(dataset), points.n_points), torch.complex64,
                                      lambda writer: write_all(writer.write), world)
    precision = run.particles.background_noise.precision(points, torch.float32)
    return FullSpectra(points, coefficients, precision, run.particles.optics_index,
                       dataset.ctf, dataset.pixel_size_a)


def half_sets(dataset, seed: int) -> Tensor:
    """(n,) long 1 or 2: the file's rlnRandomSubset when it has one, else a seeded split into
    two halves of equal size (RELION's gold-standard convention)."""
    metadata = dataset.metadata
    if "rlnRandomSubset" in metadata.columns:
        subset = torch.as_tensor(metadata["rlnRandomSubset"].to_numpy(), dtype=torch.long)
        if bool(((subset == 1) | (subset == 2)).all()) and len(subset.unique()) == 2:
            return subset
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))
    subset = torch.empty(n, dtype=torch.long)
    subset[order[: (n + 1) // 2]] = 1
    subset[order[(n + 1) // 2:]] = 2
    return subset


def start_map(run: PreparedRun, path: str) -> Tensor:
    """(N, N, N) float64: the start map low-passed to the search's cutoff and scaled to the
    particles' signal power inside it (maps come in arbitrary units)."""
    volume = read_init_map(path, run.dataset.box_size, run.dataset.pixel_size_a,
                           run.geometry.box_size, hint="refine needs --init MAP.mrc")
    volume = soft_low_pass(volume, run.geometry.cutoff_radius_px, 2.0, ndim=3)
    model = run.model
    precision = NoiseAndMask(run).precision(model)
    target = data_signal_power(model, run.particles, precision)
    power = model_signal_power(model, volume.to(run.device, run.dtype), run.particles)
    if not power > 0:
        raise InputError(path, "the map has no signal inside the start resolution")
    if not target > 0:
        raise InputError(run.config.particles, "the particles show no signal above the noise")
    return volume * math.sqrt(target / power)


def first_poses(run: PreparedRun, volume: Tensor, from_input: bool,
                world: World = ONE_PROCESS) -> tuple[Tensor, Tensor]:
    """((n, 3, 3) float64 rotations, (n, 2) float64 shifts in pixels) of every particle
    (each rank of `world` searches its share)."""
    if from_input:
        poses = run.dataset.poses
        if poses is None:
            raise InputError(run.config.particles, "has no poses (rlnAngleRot, rlnAngleTilt, "
                             "rlnAnglePsi) to start a local refinement from")
        return euler_to_matrix(poses.euler_deg.to(torch.float64)), \
            poses.shifts_px.to(torch.float64)
    precision = NoiseAndMask(run).precision(run.model)
    found = assign_poses(run, volume.to(run.device, run.dtype), precision, world=world)
    euler, shifts = run.model.pose_parameters(found.best_pose_index)
    log.info("global search at %.1f A: median best-pose probability %.2f",
             run.geometry.cutoff_resolution_a, float(found.probability.median()))
    return euler_to_matrix(euler.cpu()), shifts.cpu().to(torch.float64)


def affordable_radius(radius_px: float, run: PreparedRun, max_poses: float = 3e6) -> float:
    """The largest cutoff <= `radius_px` (and >= the first search's) whose exhaustive
    quadrature (directions x in-plane angles x shifts, over one asymmetric unit) has at most
    `max_poses` points: the search costs the fifth power of the radius."""
    order = point_group(run.config.symmetry).order
    n_shifts = run.model.n_shifts * (radius_px / run.geometry.cutoff_radius_px) ** 2
    radius = radius_px
    while radius > run.geometry.cutoff_radius_px:
        step = math.atan(1.0 / radius)
        poses = (3.6 / step) ** 2 / order * math.ceil(2 * math.pi / step) * n_shifts
        if poses <= max_poses:
            break
        radius *= 0.95
        n_shifts *= 0.95**2
    return max(radius, run.geometry.cutoff_radius_px)


def top_poses(run: PreparedRun, volume: Tensor, rows: Tensor, radius_px: float,
              top_k: int = 1, chunk_size: int = 200,
              world: World = ONE_PROCESS) -> tuple[Tensor, Tensor, float]:
    """The exhaustive search of particles `rows` (n_h,) against `volume` (N, N, N) at a
    cutoff of `radius_px`: each particle's `top_k` most probable poses, most probable first,
    as ((n_h, K, 3, 3) rotations, (n_h, K, 2) shifts px) and the median best-pose
    probability. The images are read and normalised again (as the first preprocessing);
    each rank of `world` searches its share of them."""
    model = make_model(run.config, run.geometry, radius_px)
    precision = NoiseAndMask(run).precision(model)
    dataset = run.dataset
    k = min(top_k, model.quadrature_size)
    top = [torch.zeros(0, k, dtype=torch.long)]  # a rank's share may be empty
    probability = [torch.zeros(0, dtype=torch.float64)]
    with torch.no_grad():
        slices = model.slices(volume.to(run.device, run.dtype))
        for chunk in world.share(rows).split(chunk_size):
            images = normalised_images(run, dataset.read_images(chunk.numpy()))
            blocks = model.image_blocks(images.to(run.dtype))
            table = None if precision is None else precision[run.particles.optics_index[chunk]]
            result = model.evaluate(slices, blocks, dataset.ctf.index(chunk),
                                    noise_precision=table, top_k=k)
            index = result.top_pose_index if k > 1 else result.best_pose_index.unsqueeze(1)
            top.append(index.cpu())
            probability.append(result.best_pose_probability.double().cpu())
    index = world.gathered_rows(len(rows), torch.cat(top))
    euler, shifts = model.pose_parameters(index.flatten())
    return (euler_to_matrix(euler.cpu().double()).view(len(rows), k, 3, 3),
            shifts.cpu().to(torch.float64).view(len(rows), k, 2),
            float(world.gathered_rows(len(rows), torch.cat(probability)).median()))


def coarse_steps(run: PreparedRun, radius_px: float | None = None) -> tuple[float, float]:
    """(angular step rad, shift step px) of the exhaustive search's grid at `radius_px`
    (default: the first search's cutoff); 1 px without a shift search."""
    radius = run.geometry.cutoff_radius_px if radius_px is None else radius_px
    shift_step = default_shift_step_px(run.geometry.box_size, radius) \
        if run.model.n_shifts > 1 else 1.0
    return angular_step_rad(radius), shift_step


__all__ = ["FullSpectra", "RefineConfig", "affordable_radius", "coarse_steps", "first_poses",
           "full_spectra", "half_sets", "start_map", "top_poses"]
