"""Load-time preprocessing: a particle data set -> small Fourier blocks (in memory, or in a
cache file with --cache-dir: `engine/particle_cache.py`).

Done once per run (paper section 4: images rescaled so the noise sigma is 1):
1. estimate the noise standard deviation from the background of a sample of images (and,
   while streaming, the background's power spectrum per optics group: coloured noise);
2. detect the contrast sign (protein white or black) from phase-flipped, low-passed images;
3. stream every image in chunks: subtract its background mean, divide by the noise sigma,
   apply the sign, and keep only its oversampled Fourier block inside the largest cutoff.
An epoch then never touches the full images again, and memory is bounded by the chunk size
plus the blocks (a few kB per image; on disk with --cache-dir, so not even those).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.io.cache import DiskRows
from cryostoch.io.dataset import ParticleDataset
from cryostoch.model.likelihood import LikelihoodResult, MarginalLikelihood
from cryostoch.model.noise import (
    NoiseSpectrum,
    background_power,
    soft_background_mask,
    spectrum_from_background,
)
from cryostoch.model.preprocess import (
    NormalisationStatistics,
    background_statistics,
    contrast_score,
    normalise_images,
)
from cryostoch.operators.ctf import CtfParameters

log = logging.getLogger(__name__)


@dataclass
class PreparedParticles:
    """Normalised particle spectra for the whole run, in memory or on disk (--cache-dir)."""

    blocks: Tensor | DiskRows  # (n, 2h+1, h+1) complex, the model's image layout
    ctf: CtfParameters  # (n,)
    dataset_indices: np.ndarray  # row of each particle in the source data set
    statistics: NormalisationStatistics
    optics_index: Tensor  # (n,) long, 0-based index of each particle's optics group
    background_noise: NoiseSpectrum  # sigma^2 per group and shell from the background

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def subset(self, rows: np.ndarray | Tensor) -> PreparedParticles:
        """The particles `rows`: their blocks copied when in memory, a view when on disk."""
        rows_t = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        on_disk = isinstance(self.blocks, DiskRows)
        return PreparedParticles(
            self.blocks.subset(rows_t) if on_disk else self.blocks[rows_t],
            self.ctf.index(rows_t),
            self.dataset_indices[np.asarray(rows)],
            self.statistics,
            self.optics_index[rows_t],
            self.background_noise,
        )

    def noise_precision(self, table: Tensor | None, rows: Tensor) -> Tensor | None:
        """(b, M) noise precision of particles `rows` (b,) from a (G, M) per-group `table`
        (None: white noise, None back)."""
        return None if table is None else table[self.optics_index[rows]]

    def evaluate_chunks(self, model: MarginalLikelihood, slices: Tensor, rows: Tensor, *,
                        noise_precision: Tensor | None = None,
                        class_log_weights: Tensor | None = None, statistics: bool = False,
                        chunk_size: int = 200) -> Iterator[tuple[Tensor, Tensor, LikelihoodResult]]:
        """`model.evaluate` of particles `rows` (n,) against `slices` in chunks, yielding
        (chunk rows (b,), their blocks on the model's device, the result). noise_precision:
        (G, M) per optics group or None."""
        for chunk in rows.split(chunk_size):
            blocks = self.blocks[chunk].to(model.device)
            yield chunk, blocks, model.evaluate(
                slices, blocks, self.ctf.index(chunk), statistics=statistics,
                noise_precision=self.noise_precision(noise_precision, chunk),
                class_log_weights=class_log_weights)


def estimate_normalisation(
    dataset: ParticleDataset,
    particle_radius_px: float,
    *,
    sample_size: int = 2000,
    generator: torch.Generator,
    invert: bool | None = None,
    chunk_size: int = 500,
) -> NormalisationStatistics:
    """Noise sigma (median background std) and contrast sign from a random sample of images.

    `invert` forces the sign (True: multiply the data by -1); None detects it.
    """
    n = len(dataset)
    count = min(n, sample_size)
    sample = torch.randperm(n, generator=generator)[:count].sort().values.numpy()
    stds, scores = [], []
    for start in range(0, count, chunk_size):
        rows = sample[start : start + chunk_size]
        images = dataset.read_images(rows).to(torch.float64)
        check_finite_images(dataset, rows, images)
        _, std = background_statistics(images, particle_radius_px)
        stds.append(std)
        ctf = dataset.ctf.index(torch.as_tensor(rows)) if dataset.ctf is not None else None
        scores.append(
            contrast_score(images, ctf, dataset.pixel_size_a, particle_radius_px)
        )
    std_all = torch.cat(stds)
    noise_sigma = float(std_all.median())
    if not noise_sigma > 0:
        raise InputError(dataset.source_path, "images have zero background variance (blank?)")
    score = float(torch.cat(scores).mean() / noise_sigma)
    if invert is None:
        sign = 1 if score >= 0 else -1
    else:
        sign = -1 if invert else 1
    return NormalisationStatistics(noise_sigma, sign, score, count)


def check_finite_images(dataset, rows, images: Tensor) -> None:
    """InputError naming the first image (as the file names it) with a NaN or inf pixel;
    `rows` (B,) are the images' indices in `dataset`, images (B, N, N)."""
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bool(bad.any()):
        first = int(rows[int(torch.nonzero(bad)[0])])
        raise InputError(dataset.source_path,
                         f"{dataset.image_label(first)} has NaN or infinite pixels")


def prepare_particles(
    dataset: ParticleDataset,
    model: MarginalLikelihood,
    statistics: NormalisationStatistics,
    particle_radius_px: float,
    *,
    chunk_size: int = 500,
    progress=None,
) -> PreparedParticles:
    """Normalise every image and keep its Fourier block in memory (chunked reads)."""
    check_box(dataset, model)
    layout = model.images.layout
    blocks = torch.empty(len(dataset), layout.centred_length, layout.half_length,
                         dtype=model.complex_dtype, device="cpu")

    def keep(start: int, chunk: Tensor) -> None:
        blocks[start : start + chunk.shape[0]] = chunk

    noise = stream_blocks(dataset, model, statistics, particle_radius_px, keep,
                          chunk_size=chunk_size, progress=progress)
    return particles_of(dataset, blocks, statistics, noise)


def check_box(dataset: ParticleDataset, model: MarginalLikelihood) -> None:
    """InputError unless the data set has CTFs and the model's box."""
    if dataset.ctf is None:
        raise InputError(dataset.source_path, "no CTF parameters: reconstruction needs them")
    if dataset.box_size != model.config.box_size:
        raise InputError(
            dataset.source_path,
            f"box {dataset.box_size} does not match the model box {model.config.box_size}",
        )


def optics_indices(dataset: ParticleDataset) -> Tensor:
    """(n,) long 0-based optics group of every particle (groups in sorted order)."""
    _, index = np.unique(np.asarray(dataset.optics_group), return_inverse=True)
    return torch.as_tensor(index.reshape(-1), dtype=torch.long)


def particles_of(dataset: ParticleDataset, blocks, statistics: NormalisationStatistics,
                 noise: NoiseSpectrum) -> PreparedParticles:
    """PreparedParticles of every particle of `dataset` with their `blocks` (n, 2h+1, h+1):
    a tensor, or rows on disk (`io.cache.DiskRows`)."""
    return PreparedParticles(blocks, dataset.ctf, np.arange(len(dataset)), statistics,
                             optics_indices(dataset), noise)


def stream_blocks(
    dataset: ParticleDataset,
    model: MarginalLikelihood,
    statistics: NormalisationStatistics,
    particle_radius_px: float,
    write,
    *,
    chunk_size: int = 500,
    progress=None,
) -> NoiseSpectrum:
    """Read the images in chunks of at most `chunk_size`, normalise them and hand each
    chunk's Fourier blocks (b, 2h+1, h+1), in order, to `write(first row, blocks)`; returns
    the background noise spectrum. Memory: one chunk of images, whatever the data set's size.
    """
    check_box(dataset, model)
    n = len(dataset)
    optics_index = optics_indices(dataset)
    n_groups = int(optics_index.max()) + 1 if n else 1
    mask = soft_background_mask(dataset.box_size, particle_radius_px)
    power_sum = torch.zeros(n_groups, dataset.box_size // 2 + 1, dtype=torch.float64)
    done = 0
    for rows, images in dataset.iter_chunks(chunk_size):
        images = images.to(torch.float64)
        check_finite_images(dataset, rows, images)
        normalised = normalise_images(
            images, particle_radius_px, statistics.noise_sigma, statistics.contrast_sign
        )
        write(done, model.image_blocks(normalised.to(model.dtype)).cpu())
        power, counts = background_power(normalised, mask)
        power_sum.index_add_(0, optics_index[done : done + len(rows)], power)
        done += len(rows)
        if progress is not None:
            progress(len(rows))
    if done != n:
        raise InputError(dataset.source_path, f"read {done} images but expected {n}")
    group_sizes = torch.bincount(optics_index, minlength=n_groups).to(torch.float64)
    return NoiseSpectrum(spectrum_from_background(power_sum, counts, group_sizes, mask))


class ResampledDataset:
    """A read-only view of a data set Fourier-cropped to a smaller working box."""

    def __init__(self, dataset: ParticleDataset, box_size: int) -> None:
        from cryostoch.fourier.resample import resample_images

        self._dataset = dataset
        self._resample = resample_images
        self.box_size = box_size
        self.pixel_size_a = dataset.pixel_size_a * dataset.box_size / box_size
        self.ctf = dataset.ctf
        self.optics_group = dataset.optics_group
        self.source_path = dataset.source_path

    def __len__(self) -> int:
        return len(self._dataset)

    def image_label(self, index: int) -> str:
        return self._dataset.image_label(index)

    def read_images(self, indices) -> Tensor:
        images = self._dataset.read_images(indices)
        return self._resample(images.to(torch.float64), self.box_size).to(images.dtype)

    def iter_chunks(self, chunk_size: int, indices=None):
        for rows, images in self._dataset.iter_chunks(chunk_size, indices):
            yield rows, self._resample(images.to(torch.float64), self.box_size).to(images.dtype)
