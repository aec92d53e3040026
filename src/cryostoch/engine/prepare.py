"""Everything a run needs before its first step: `prepare_run(config) -> PreparedRun`.

Open the particles (with the optional 2-D class selection and half-set split), choose the
working box and cutoff, measure the normalisation and contrast sign, preprocess every image
once into small Fourier blocks and hold out a seeded test set. Stochastic runs and baselines
start from the same `PreparedRun`, so for one seed they see the same data and the same start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cryostoch.engine.checks import check_before_work, check_cutoff
from cryostoch.engine.config import (
    DEFAULT_CUTOFF_PER_DIAMETER,
    DEFAULT_DIAMETER_BOX_FRACTION,
    DEFAULT_SHIFT_BOX_FRACTION,
    MASK_KINDS,
    ReconstructionConfig,
)
from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.particle_cache import cached_rows, source_fingerprint
from cryostoch.engine.preprocess import (
    PreparedParticles,
    ResampledDataset,
    estimate_normalisation,
    particles_of,
    prepare_particles,
    stream_blocks,
)
from cryostoch.engine.progress import progress_bar
from cryostoch.errors import InputError
from cryostoch.fourier.resample import resample_volume
from cryostoch.geometry.quadrature import max_radius_px, orientation_quadrature
from cryostoch.geometry.symmetry import (
    is_signed_permutation_group,
    point_group,
    restrict_orientation_quadrature,
    symmetrize_volume,
    voxel_permutation,
)
from cryostoch.io.dataset import ParticleDataset, open_particles
from cryostoch.io.mrc import check_map, read_map
from cryostoch.io.star import read_class_assignments
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.noise import NoiseSpectrum
from cryostoch.model.preprocess import NormalisationStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkingGeometry:
    """The box the likelihood works in (the data's, or a Fourier crop of it)."""

    box_size: int
    pixel_size_a: float
    cutoff_radius_px: float  # final likelihood cutoff, Fourier pixels of the working box
    particle_radius_px: float
    shift_range_a: float  # radius of the shift search (0: none)
    chosen: tuple[str, ...] = ()  # how each value left to the defaults was chosen (logged)

    @property
    def cutoff_resolution_a(self) -> float:
        return self.resolution_a(self.cutoff_radius_px)

    def resolution_a(self, radius_px: float) -> float:
        return self.box_size * self.pixel_size_a / radius_px


def working_geometry(config: ReconstructionConfig, data_box: int,
                     data_pixel_a: float) -> WorkingGeometry:
    """Working box, pixel size, cutoff, particle radius and shift range for particles of
    `data_box` pixels of `data_pixel_a`: from the options, or, for those left out, from the
    box (config.py's DEFAULT_* constants)."""
    box = config.box_size or data_box
    if box > data_box:
        raise InputError("--box", f"{box} is larger than the data's box {data_box}")
    pixel = data_pixel_a * data_box / box
    extent_a = box * pixel
    chosen = []
    diameter_a = config.particle_diameter_a
    if diameter_a is None:
        diameter_a = DEFAULT_DIAMETER_BOX_FRACTION * extent_a
        chosen.append(f"particle diameter {diameter_a:.0f} A "
                      f"({DEFAULT_DIAMETER_BOX_FRACTION:.0%} of the box; --particle-diameter-a)")
    if config.resolution_a is not None:
        radius = extent_a / config.resolution_a
    elif config.max_freq is not None:
        radius = max_radius_px(box, config.max_freq)
    else:
        radius = min(extent_a / (DEFAULT_CUTOFF_PER_DIAMETER * diameter_a), box / 2 - 3)
        chosen.append(f"cutoff {extent_a / radius:.1f} A (the particle diameter / "
                      f"{1 / DEFAULT_CUTOFF_PER_DIAMETER:g}; --resolution-a)")
    check_cutoff(radius, box, pixel, config.cutoff_option)
    if radius < 2:
        raise InputError(config.cutoff_option,
                         f"cutoff of {radius:.2f} Fourier pixels is too coarse")
    shift_range_a = config.shift_range_a
    if shift_range_a is None:
        shift_range_a = DEFAULT_SHIFT_BOX_FRACTION * extent_a
        chosen.append(f"shifts within {shift_range_a:.1f} A "
                      f"({DEFAULT_SHIFT_BOX_FRACTION:.0%} of the box; --shift-range-a)")
    particle_radius_px = min(0.5 * diameter_a / pixel, box / 2 - 2)
    return WorkingGeometry(box, pixel, radius, particle_radius_px, shift_range_a, tuple(chosen))


def read_mask(path: str, box: int) -> Tensor:
    """(N, N, N) float64 mask from an MRC file, resampled to the working box, in [0, 1]."""
    if not Path(path).exists():
        raise InputError(path, "no such mask file (use --mask auto, sphere or none)")
    mask, _ = read_map(path)
    check_map(path, mask, allow_constant=True)  # cubic and finite; a mask of ones is fine
    mask = mask.to(torch.float64)
    if mask.shape[-1] != box:
        mask = resample_volume(mask, box)
    mask = mask.clamp(0, 1)
    if not float(mask.max()) > 0:
        raise InputError(path, "the mask is empty")
    return mask


def select_particles(config: ReconstructionConfig, dataset: ParticleDataset) -> ParticleDataset:
    """Optional 2-D class selection and half-set split."""
    rows = np.arange(len(dataset))
    if config.class_file:
        names, classes = read_class_assignments(config.class_file)
        if "rlnImageName" not in dataset.metadata.columns:
            raise InputError(config.particles, "class selection needs rlnImageName")
        keep = set(config.keep_classes)
        if not keep:
            raise InputError("--keep-classes", "give the class numbers to keep")
        kept_names = set(names[np.isin(classes, sorted(keep))])
        rows = rows[dataset.metadata["rlnImageName"].isin(kept_names).to_numpy()]
        if len(rows) == 0:
            raise InputError(config.class_file, f"no particles in classes {sorted(keep)}")
    if config.half_set is not None:
        rows = rows[(config.half_set - 1) :: 2]
    return dataset.subset(rows) if len(rows) != len(dataset) else dataset


@dataclass
class PreparedRun:
    """The selected data, its working geometry, the final-cutoff model and the split.

    `model` (final cutoff, temperature 1) lays out the preprocessed blocks, scores the
    held-out set at every point of a run (so curves stay comparable) and gives the poses.
    """

    config: ReconstructionConfig
    dataset: ParticleDataset  # the selected particles at the data's own box
    geometry: WorkingGeometry
    model: MarginalLikelihood
    particles: PreparedParticles  # every selected particle, preprocessed
    train_rows: np.ndarray  # rows of `particles` used for training, sorted
    test_rows: np.ndarray  # held-out rows, sorted
    train: PreparedParticles
    test: PreparedParticles | None
    symmetrize: Symmetrizer  # the point group's average of a map
    given_mask: Tensor | None  # (N, N, N) float64 from --mask MASK.mrc, None otherwise

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def test_nll(self, volume: Tensor, noise_precision: Tensor | None = None,
                 class_log_weights: Tensor | None = None,
                 world: World = ONE_PROCESS) -> float | None:
        """Mean held-out NLL per image of `volume` (N, N, N) or (K, N, N, N) at the final
        cutoff; each rank of `world` scores its share of the held-out images.

        noise_precision: (G, M) per optics group at the final model's coefficients, or None
        (white noise); class_log_weights: (K,) log class proportions (None: uniform).
        """
        if self.test is None:
            return None
        total = 0.0
        with torch.no_grad():
            slices = self.model.slices(volume.detach())
            for _, _, result in self.test.evaluate_chunks(
                    self.model, slices, world.share(torch.arange(len(self.test))),
                    chunk_size=100, noise_precision=noise_precision,
                    class_log_weights=class_log_weights):
                total += float(result.nll.sum())
        return world.sum_float(total) / len(self.test)

    def model_at(self, radius_px: float, temperature: float = 1.0) -> MarginalLikelihood:
        """The likelihood at a cutoff and posterior temperature (noise sigma sqrt(T)): the
        final-cutoff `model` itself when they are the final ones."""
        if radius_px == self.geometry.cutoff_radius_px and temperature == 1:
            return self.model
        return make_model(self.config, self.geometry, radius_px, temperature)


def make_model(config: ReconstructionConfig, geometry: WorkingGeometry, radius_px: float,
               temperature: float = 1.0) -> MarginalLikelihood:
    pixel = geometry.pixel_size_a
    likelihood = LikelihoodConfig(
        box_size=geometry.box_size,
        pixel_size_a=pixel,
        max_radius_px=radius_px,
        noise_sigma=math.sqrt(temperature),
        volume_oversampling=config.volume_oversampling,
        image_oversampling=config.image_oversampling,
        shift_radius_px=geometry.shift_range_a / pixel,
        shift_sigma_px=config.shift_sigma_px(geometry.shift_range_a, pixel),
        memory_budget_mb=config.memory_budget_mb,
        n_classes=config.classes,
    )
    device = torch.device(config.device)
    orientations = None
    group = point_group(config.symmetry)
    if group.order > 1:
        # a symmetric map projects alike at R and R g: one asymmetric unit of directions
        full = orientation_quadrature(radius_px, dtype=torch.float64, device=device)
        orientations = restrict_orientation_quadrature(full, group)
    return MarginalLikelihood(likelihood, dtype=getattr(torch, config.dtype), device=device,
                              orientations=orientations)


class Symmetrizer:
    """Averages maps over the run's point group. It runs on every gradient, so the voxel
    permutation of an axis-permuting group (D2, ...) is built once, not per call."""

    def __init__(self, symmetry: str, box_size: int, device: torch.device) -> None:
        self.group = point_group(symmetry)
        self._permutation = None
        if self.group.order > 1 and is_signed_permutation_group(self.group):
            self._permutation = voxel_permutation(self.group, box_size, device)

    def __call__(self, volume: Tensor) -> Tensor:
        """The map (N, N, N), or each class of (K, N, N, N), averaged over the group."""
        if self.group.order == 1:
            return volume
        if volume.dim() == 3:
            return symmetrize_volume(volume, self.group, permutation=self._permutation)
        return torch.stack([symmetrize_volume(v, self.group, permutation=self._permutation)
                            for v in volume])


def prepare_run(config: ReconstructionConfig, *, progress: bool = True,
                world: World = ONE_PROCESS) -> PreparedRun:
    """Open, select, measure and preprocess the particles; split off the test set. With
    --cache-dir, rank 0 of `world` builds the cache and every rank reads it."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was requested but torch sees no GPU")
    dataset = open_particles(config.particles, project_root=config.project_root)
    if dataset.ctf is None:
        raise InputError(config.particles, "no CTF parameters: reconstruction needs them")
    dataset = select_particles(config, dataset)
    geometry = working_geometry(config, dataset.box_size, dataset.pixel_size_a)
    for choice in geometry.chosen:
        log.info("from the data: %s", choice)
    check_before_work(config, dataset, geometry)  # issue 14: fail before any heavy work
    # read before the preprocessing, so that a bad mask file fails at once
    given_mask = None if config.mask in MASK_KINDS else read_mask(config.mask, geometry.box_size)
    model = make_model(config, geometry, geometry.cutoff_radius_px)
    particles = _preprocess(config, dataset, geometry, model, progress, world)
    n = len(particles)  # more than config.test_size: `check_before_work`
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 7919))
    test_rows = perm[: config.test_size].sort().values.numpy()
    train_rows = perm[config.test_size :].sort().values.numpy()
    train = particles.subset(train_rows)
    test = particles.subset(test_rows) if config.test_size else None
    if device.type != "cpu" and isinstance(train.blocks, Tensor):  # on disk: by the chunk
        train.blocks = train.blocks.to(device)
        if test is not None:
            test.blocks = test.blocks.to(device)
    return PreparedRun(config, dataset, geometry, model, particles, train_rows, test_rows,
                       train, test, Symmetrizer(config.symmetry, geometry.box_size, device),
                       given_mask)


def _preprocess(config: ReconstructionConfig, dataset: ParticleDataset,
                geometry: WorkingGeometry, model: MarginalLikelihood,
                progress: bool, world: World) -> PreparedParticles:
    """Normalisation, contrast sign and every image's Fourier block (logged): in memory, or
    in the --cache-dir file (read back, or built by rank 0)."""
    data = dataset
    if config.box_size and config.box_size != dataset.box_size:
        data = ResampledDataset(dataset, config.box_size)
    if config.cache_dir is None:
        stats = _normalisation(config, data, geometry)
        bar = progress_bar(len(data), "preprocessing", progress)
        prepared = prepare_particles(data, model, stats, geometry.particle_radius_px,
                                     progress=bar.update if bar else None)
        if bar:
            bar.close()
    else:
        prepared = _cached_particles(config, dataset, data, geometry, model, progress, world)
    stats = prepared.statistics
    log.info(
        "noise sigma %.4g (background of %d images); contrast %s (score %+.3f)%s",
        stats.noise_sigma, stats.n_images_used,
        "protein white" if stats.contrast_sign > 0 else "protein black: inverting",
        stats.sign_score, "" if config.invert is None else " [forced by --invert]",
    )
    return prepared


def _normalisation(config: ReconstructionConfig, data, geometry: WorkingGeometry
                   ) -> NormalisationStatistics:
    g = torch.Generator().manual_seed(config.seed)
    return estimate_normalisation(data, geometry.particle_radius_px, generator=g,
                                  invert=config.invert)


def _cached_particles(config: ReconstructionConfig, dataset: ParticleDataset, data,
                      geometry: WorkingGeometry, model: MarginalLikelihood, progress: bool,
                      world: World) -> PreparedParticles:
    """`prepare_particles` with the blocks in a --cache-dir file (`engine/particle_cache.py`):
    the same numbers, streamed to disk chunk by chunk, or read back when the key matches."""
    layout = model.images.layout
    shape = (len(data), layout.centred_length, layout.half_length)
    key = {"source": source_fingerprint(dataset), "box": geometry.box_size,
           "cutoff_radius_px": model.config.max_radius_px,
           "image_oversampling": config.image_oversampling,
           "particle_radius_px": geometry.particle_radius_px, "invert": config.invert,
           "seed": config.seed}

    def build(writer) -> dict:
        stats = _normalisation(config, data, geometry)
        bar = progress_bar(len(data), "preprocessing", progress)
        noise = stream_blocks(data, model, stats, geometry.particle_radius_px, writer.write,
                              progress=bar.update if bar else None)
        if bar:
            bar.close()
        return {"statistics": dataclasses.asdict(stats),
                "noise_variance": noise.variance.tolist()}  # float64: exact through JSON

    blocks, results = cached_rows(config.cache_dir, "blocks", key, shape, model.complex_dtype,
                                  build, world)
    noise = NoiseSpectrum(torch.tensor(results["noise_variance"], dtype=torch.float64))
    return particles_of(data, blocks, NormalisationStatistics(**results["statistics"]), noise)
