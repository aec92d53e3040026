"""Real-data hazards for simulated particles: junk images and per-particle contrast.

Junk (`--junk-fraction F`): round(F n) particles, chosen by a seeded random permutation, are
not the molecule; they are split into three kinds in turn (counts differ by at most one):

- ice (1): 1-4 Gaussian blobs in 3-D (centres uniform in a ball of 0.35 N, sigma uniform in
  0.03-0.1 N, mass proportional to sigma^3 times a uniform 0.5-1), projected along z (the
  projection of an isotropic blob does not depend on the rotation), times the particle's CTF;
  scaled so that its noise-free variance over the box is the SNR's signal variance times a
  log-uniform 0.5-4 brightness;
- empty (2): no signal, noise only;
- neighbour (3): the molecule's noise-free image (pose, CTF, shift of its row) translated by
  0.35-0.5 N in a uniform random direction, rounded to whole pixels, with what leaves the box
  dropped and zeros coming in (not wrapped round), so only part of it is in the box.

Their STAR rows are drawn exactly like good ones (random pose, real CTF, shift); the truth is
in the extra column `rlnCryostochJunk` (0 good, 1 ice, 2 empty, 3 neighbour).

Contrast (`--contrast-sigma S`): every particle's noise-free image is multiplied by
exp(S z), z standard normal (log-normal, median 1; like RELION's rlnGroupScaleCorrection),
recorded as `rlnCryostochScale`. The density's scale for the SNR is set before this factor,
so the realised SNR grows by about exp(2 S^2).

Randomness: streams of the simulation seed separate from the poses, CTFs, shifts and noise
(so switching hazards on changes nothing else); everything is drawn per particle, so chunking
does not change the images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cryostoch.errors import InputError
from cryostoch.operators.shift import shift_phases
from cryostoch.simulate.particles import ParticleParameters, ProjectionModel, stream_generator

GOOD, ICE, EMPTY, NEIGHBOUR = 0, 1, 2, 3
KIND_NAMES = ("good", "ice", "empty", "neighbour")
STREAM_JUNK, STREAM_CONTRAST, STREAM_GEOMETRY = 5, 6, 7
NEIGHBOUR_OFFSET_BOX = (0.35, 0.5)  # neighbour translation, fraction of the box
ICE_BLOBS = (1, 4)  # blobs per ice image, inclusive
ICE_CENTRE_BOX = 0.35  # blob centres uniform in a ball of this radius (fraction of the box)
ICE_SIGMA_BOX = (0.03, 0.1)  # blob sigma, fraction of the box
ICE_BRIGHTNESS = (0.5, 4.0)  # ice variance / the SNR's signal variance, log-uniform


class Hazards:
    """Per-particle hazards: `kinds` (n,) int8 junk code; `contrast` (n,) float64 signal
    factor; `seeds` (n,) uint64 seed of each particle's junk geometry."""

    def __init__(self, kinds: np.ndarray, contrast: np.ndarray, seeds: np.ndarray):
        self.kinds, self.contrast, self.seeds = kinds, contrast, seeds

    def __len__(self) -> int:
        return int(self.kinds.shape[0])

    def index(self, rows: slice) -> Hazards:
        return Hazards(self.kinds[rows], self.contrast[rows], self.seeds[rows])

    def counts(self) -> dict[str, int]:
        tally = np.bincount(self.kinds, minlength=len(KIND_NAMES))
        return {name: int(c) for name, c in zip(KIND_NAMES, tally, strict=True)}


def check_hazard_options(junk_fraction: float, contrast_sigma: float) -> None:
    """InputError naming the option for a junk fraction outside [0, 1) or a negative sigma."""
    if not (isinstance(junk_fraction, (int, float)) and 0 <= junk_fraction < 1):
        raise InputError("--junk-fraction", f"must be in [0, 1), got {junk_fraction!r}")
    if not (isinstance(contrast_sigma, (int, float)) and math.isfinite(contrast_sigma)
            and contrast_sigma >= 0):
        raise InputError("--contrast-sigma", f"must be a number >= 0, got {contrast_sigma!r}")


def junk_kinds(n: int, fraction: float, generator: torch.Generator) -> np.ndarray:
    """(n,) int8: round(fraction n) random particles get kinds 1, 2, 3, 1, 2, ... in turn."""
    kinds = np.zeros(n, dtype=np.int8)
    count = int(round(fraction * n))
    if count:
        chosen = torch.randperm(n, generator=generator)[:count].numpy()
        kinds[chosen] = 1 + np.arange(count) % 3
    return kinds


def draw_hazards(n: int, *, seed: int, junk_fraction: float = 0.0,
                 contrast_sigma: float = 0.0) -> Hazards:
    """Junk kinds, contrast factors and geometry seeds of n particles (module docstring)."""
    kinds = junk_kinds(n, junk_fraction, stream_generator(seed, STREAM_JUNK))
    contrast = np.ones(n, dtype=np.float64)
    if contrast_sigma > 0:
        z = torch.randn(n, generator=stream_generator(seed, STREAM_CONTRAST), dtype=torch.float64)
        contrast = np.exp(contrast_sigma * z.numpy())
    seeds = np.random.SeedSequence([int(seed), STREAM_GEOMETRY]).generate_state(n, np.uint64)
    return Hazards(kinds, contrast, seeds)


def neighbour_offsets(seeds: np.ndarray, box_size: int) -> np.ndarray:
    """(B, 2) int64 translations (dx, dy) in pixels from per-particle seeds (B,): length
    uniform in NEIGHBOUR_OFFSET_BOX times the box, direction uniform."""
    out = np.zeros((len(seeds), 2), dtype=np.int64)
    for j, s in enumerate(np.asarray(seeds, dtype=np.uint64).tolist()):
        rng = np.random.default_rng(int(s))
        length = rng.uniform(*NEIGHBOUR_OFFSET_BOX) * box_size
        angle = rng.uniform(0, 2 * math.pi)
        out[j] = np.round([length * math.cos(angle), length * math.sin(angle)])
    return out


def shift_with_zero_fill(images: Tensor, offsets_px: np.ndarray) -> Tensor:
    """images (B, N, N) translated by whole pixels offsets_px (B, 2) (dx, dy), |d| < N: what
    leaves the box is dropped, zeros come in. Returns (B, N, N)."""
    out = torch.zeros_like(images)
    n = images.shape[-1]
    for j, (dx, dy) in enumerate(np.asarray(offsets_px).tolist()):
        dst_x, src_x = slice(max(dx, 0), n + min(dx, 0)), slice(max(-dx, 0), n - max(dx, 0))
        dst_y, src_y = slice(max(dy, 0), n + min(dy, 0)), slice(max(-dy, 0), n - max(dy, 0))
        out[j, dst_y, dst_x] = images[j, src_y, src_x]
    return out


def ice_blobs(seed: int, box_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One ice image's blobs from its seed: centres (b, 2) (x, y) px from the box centre,
    sigmas (b,) px, masses (b,), and its brightness (variance / the signal variance)."""
    rng = np.random.default_rng(int(seed))
    b = int(rng.integers(ICE_BLOBS[0], ICE_BLOBS[1] + 1))
    direction = rng.normal(size=(b, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = ICE_CENTRE_BOX * box_size * rng.uniform(size=(b, 1)) ** (1 / 3)
    centres = (direction * radius)[:, :2]  # projected along z
    sigmas = rng.uniform(*ICE_SIGMA_BOX, size=b) * box_size
    masses = sigmas**3 * rng.uniform(0.5, 1.0, size=b)
    brightness = math.exp(rng.uniform(math.log(ICE_BRIGHTNESS[0]), math.log(ICE_BRIGHTNESS[1])))
    return centres, sigmas, masses, brightness


def ice_images(model: ProjectionModel, seeds: np.ndarray, ctf, signal_variance: float
               ) -> Tensor:
    """(B, N, N) noise-free ice images of per-particle seeds (B,) with their CTFs (B,) on the
    model's frequencies, each scaled to variance brightness * signal_variance."""
    n = model.box_size
    k2 = (model.kx * model.kx + model.ky * model.ky) / (n * n)  # (M,) (cycles per pixel)^2
    spectra = []
    brightness = []
    for s in np.asarray(seeds, dtype=np.uint64).tolist():
        centres, sigmas, masses, bright = ice_blobs(s, n)
        t = torch.as_tensor(centres, dtype=model.dtype, device=model.device)
        phases = shift_phases(model.kx, model.ky, t, n)  # (b, M)
        sig = torch.as_tensor(sigmas, dtype=model.dtype, device=model.device)[:, None]
        mass = torch.as_tensor(masses, dtype=model.dtype, device=model.device)[:, None]
        spectra.append((phases * (mass * torch.exp(-2 * math.pi**2 * sig**2 * k2))).sum(0))
        brightness.append(bright)
    values = torch.stack(spectra) * model.ctf_grid(ctf).to(device=model.device,
                                                           dtype=model.dtype)
    images = model.to_images(values)
    variance = images.to(torch.float64).var(dim=(-2, -1), unbiased=False)
    target = torch.as_tensor(brightness, dtype=torch.float64) * signal_variance
    factor = torch.sqrt(target.to(variance.device) / variance.clamp(min=1e-300))
    return images * factor.to(images.dtype)[:, None, None]


def hazard_images(model: ProjectionModel, params: ParticleParameters, hazards: Hazards,
                  signal_variance: float) -> Tensor:
    """(B, N, N) noise-free images of B particles: the molecule's (`particle_images`), with
    junk rows replaced (module docstring) and every row times its contrast factor.
    `signal_variance`: the SNR's mean signal variance (sets the ice brightness)."""
    images = model.particle_images(params)
    kinds = hazards.kinds
    rows = np.flatnonzero(kinds == NEIGHBOUR)
    if rows.size:
        offsets = neighbour_offsets(hazards.seeds[rows], model.box_size)
        images[rows] = shift_with_zero_fill(images[rows], offsets)
    rows = np.flatnonzero(kinds == ICE)
    if rows.size:
        ice_ctf = params.ctf.index(torch.from_numpy(rows))
        images[rows] = ice_images(model, hazards.seeds[rows], ice_ctf, signal_variance)
    rows = np.flatnonzero(kinds == EMPTY)
    if rows.size:
        images[rows] = 0
    if (hazards.contrast != 1).any():
        factor = torch.as_tensor(hazards.contrast, dtype=images.dtype, device=images.device)
        images = images * factor[:, None, None]
    return images


def montage_labels(hazards: Hazards, k: int, junk_fraction: float) -> list[str] | None:
    """The junk kind of the first k particles, for the montage's titles (None without junk)."""
    return [KIND_NAMES[c] for c in hazards.kinds[:k]] if junk_fraction > 0 else None


def star_columns(hazards: Hazards, junk_fraction: float, contrast_sigma: float
                 ) -> dict[str, np.ndarray]:
    """The truth columns for the STAR file (only those of hazards switched on)."""
    columns = {}
    if junk_fraction > 0:
        columns["rlnCryostochJunk"] = hazards.kinds.astype(np.int64)
    if contrast_sigma > 0:
        columns["rlnCryostochScale"] = hazards.contrast
    return columns


def hazard_summary(hazards: Hazards, junk_fraction: float, contrast_sigma: float,
                   signal_by_kind: np.ndarray) -> dict:
    """simulation.json's record of the hazards; signal_by_kind (4,): summed noise-free image
    variances of each kind."""
    counts = hazards.counts()
    log_factor = np.log(hazards.contrast)
    return {
        "junk": {
            "fraction": junk_fraction,
            "counts": counts,
            "codes": {name: code for code, name in enumerate(KIND_NAMES)},
            "mean_signal_variance": {
                name: float(signal_by_kind[code] / counts[name]) if counts[name] else None
                for code, name in enumerate(KIND_NAMES)},
        },
        "contrast": {
            "sigma": contrast_sigma,
            "realised_log_std": float(log_factor.std()) if len(hazards) > 1 else 0.0,
        },
    }


__all__ = [
    "EMPTY",
    "GOOD",
    "ICE",
    "KIND_NAMES",
    "NEIGHBOUR",
    "Hazards",
    "check_hazard_options",
    "draw_hazards",
    "hazard_images",
    "hazard_summary",
    "ice_blobs",
    "ice_images",
    "junk_kinds",
    "montage_labels",
    "neighbour_offsets",
    "shift_with_zero_fill",
    "star_columns",
]
