"""Particle images from a density by the likelihood's own forward model, plus white noise.

Forward model (identical to `cryostoch.model.likelihood.MarginalLikelihood`'s, extended to the
whole Nyquist disc): for a density V on an N^3 grid with pixel size p,

1. its oversampled spectrum: the exact DTFT of V on the grid of spacing 1/oversampling
   (`PrunedDft(SpectrumLayout(N, N/2 + 1, oversampling)).volume(V)`, oversampling 2 by default
   like `LikelihoodConfig.volume_oversampling`), a block that covers the whole Nyquist ball
   plus the trilinear stencil's reach;
2. the central slice of rotation A at every `rfft2c` grid frequency k with |k| <= N/2, read by
   trilinear interpolation (`extract_slices`), times sqrt(N) (a projection sums the voxels
   along z); zero outside that disc;
3. times the CTF (RELION's formula, frequencies k / (N p)) and the shift phase
   exp(-2 pi i k.t / N) (the particle centre sits at pixel N//2 + t);
4. back to real space with `irfft2c`.

So the noise-free part of every image is exactly what the likelihood predicts at the particle's
ground-truth pose (checked by the tests) on the coefficients the likelihood uses.

Noise and SNR: images are `scale * clean + noise` with white Gaussian noise of standard
deviation sigma = 1 (the paper's convention: images in units of the noise; coloured noise
and junk are in `cryostoch.simulate.noise` and `cryostoch.simulate.hazards`). The SNR is

    SNR = mean over images of Var(noise-free image over the whole N x N box) / sigma^2,

and the density's scale is set so that it equals the requested SNR, measured on a pilot: the
noise-free images of the first `pilot_size` particles (all of them when there are fewer). The
pilot's images are regenerated in the main pass, so generation stays streamed and the output
does not depend on the chunk size (to rounding). The ground-truth map written alongside is the
scaled density, in the same units as the images.

Randomness: one integer seed. Independent streams (numpy `SeedSequence([seed, stream])`) give
the rotations (Haar-uniform, `random_rotations`), CTF draws, shifts (normal with sigma, truncated
to a disc of 3 sigma; none when sigma = 0, like the paper) and one noise seed per particle, so
particle i's noise depends only on (seed, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryostoch.fourier.grids import rfft2_grid
from cryostoch.fourier.spectrum import PrunedDft, SpectrumLayout
from cryostoch.fourier.transforms import irfft2c
from cryostoch.geometry.rotations import euler_to_matrix, matrix_to_euler, random_rotations
from cryostoch.operators.ctf import CtfGrid, CtfParameters
from cryostoch.operators.shift import shift_phases
from cryostoch.operators.slicing import extract_slices
from cryostoch.simulate.ctf import CtfSampler

SHIFT_TRUNCATION = 3.0  # shifts are normal, truncated to a disc of this many sigmas
STREAM_ROTATIONS, STREAM_CTF, STREAM_SHIFTS, STREAM_NOISE = 1, 2, 3, 4


def stream_generator(seed: int, stream: int, device: torch.device | str | None = None):
    """A torch.Generator for one named random stream of a simulation seed."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed(int(state))
    return generator


def noise_seeds(seed: int, n: int) -> np.ndarray:
    """One 64-bit seed per particle (`noise_seeds(s, n)[:m] == noise_seeds(s, m)`)."""
    return np.random.SeedSequence([int(seed), STREAM_NOISE]).generate_state(int(n), np.uint64)


def particle_noise(seeds: np.ndarray, box_size: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise (len(seeds), N, N): image j from its own seed `seeds[j]`.

    Always drawn in float32 on the CPU (then converted), so the noise does not depend on the
    device or precision the images are computed in.
    """
    out = torch.empty(len(seeds), box_size, box_size, dtype=torch.float32)
    generator = torch.Generator()
    for j, s in enumerate(np.asarray(seeds, dtype=np.uint64).tolist()):
        generator.manual_seed(int(s))
        out[j] = torch.randn(box_size, box_size, generator=generator)
    return out.to(device=device, dtype=dtype)


def truncated_normal_shifts(n: int, sigma_px: float, generator: torch.Generator,
                            truncation: float = SHIFT_TRUNCATION) -> Tensor:
    """(n, 2) shifts (tx, ty) in pixels: isotropic normal with `sigma_px`, redrawn until inside
    the disc of radius `truncation * sigma_px`. Zeros when sigma_px = 0."""
    out = torch.zeros(n, 2, dtype=torch.float64)
    if sigma_px <= 0 or n == 0:
        return out
    todo = torch.arange(n)
    while todo.numel():
        draw = torch.randn(todo.numel(), 2, generator=generator, dtype=torch.float64) * sigma_px
        inside = draw.norm(dim=1) <= truncation * sigma_px
        out[todo[inside]] = draw[inside]
        todo = todo[~inside]
    return out


@dataclass(frozen=True)
class ParticleParameters:
    """Ground truth of every simulated particle.

    `euler_deg` (n, 3) RELION (rot, tilt, psi); `rotations` (n, 3, 3) = euler_to_matrix of
    them (what the images are made with); `shifts_px` (n, 2) (tx, ty), the particle centre at
    N//2 + t; `ctf` per particle; `optics_index` (n,) 0-based index into the sampler's optics.
    """

    euler_deg: Tensor
    rotations: Tensor
    shifts_px: Tensor
    ctf: CtfParameters
    optics_index: np.ndarray

    def __len__(self) -> int:
        return int(self.euler_deg.shape[0])

    def index(self, indices: slice | Tensor | np.ndarray | list[int]) -> ParticleParameters:
        if isinstance(indices, np.ndarray):
            indices = torch.from_numpy(indices)
        if isinstance(indices, list):
            indices = torch.tensor(indices, dtype=torch.long)
        rows = indices.numpy() if isinstance(indices, Tensor) else indices
        return ParticleParameters(
            self.euler_deg[indices], self.rotations[indices], self.shifts_px[indices],
            self.ctf.index(indices), self.optics_index[rows],
        )


def draw_particle_parameters(
    n: int, ctf_sampler: CtfSampler, *, seed: int, shift_sigma_px: float = 0.0
) -> ParticleParameters:
    """Haar-uniform rotations, CTFs from the sampler and truncated-normal shifts (see the
    module docstring), deterministic given the seed."""
    if n < 1:
        raise ValueError(f"need at least one particle, got {n}")
    matrices = random_rotations(n, stream_generator(seed, STREAM_ROTATIONS), dtype=torch.float64)
    euler = matrix_to_euler(matrices)
    ctf, optics_index = ctf_sampler.draw(n, stream_generator(seed, STREAM_CTF))
    shifts = truncated_normal_shifts(n, shift_sigma_px, stream_generator(seed, STREAM_SHIFTS))
    return ParticleParameters(euler, euler_to_matrix(euler), shifts, ctf, optics_index)


class ProjectionModel:
    """The forward model of one density (see the module docstring), on its device and dtype.

    `kx`, `ky` (M,) are the frequencies (cycles per box) of the `rfft2c` coefficients inside
    the Nyquist disc; `spectra` gives the model's values there, `images` the real images.
    """

    def __init__(self, volume: Tensor, pixel_size_a: float, *, oversampling: int = 2):
        n = volume.shape[-1]
        if tuple(volume.shape) != (n, n, n):
            raise ValueError(f"volume must be cubic, got {tuple(volume.shape)}")
        if not volume.dtype.is_floating_point:
            raise ValueError("volume must be a floating-point tensor")
        if oversampling < 1:
            raise ValueError("oversampling must be >= 1")
        self.box_size = n
        self.pixel_size_a = float(pixel_size_a)
        self.oversampling = int(oversampling)
        self.dtype = volume.dtype
        self.device = volume.device
        self.layout = SpectrumLayout(n, n / 2 + 1, self.oversampling)
        dft = PrunedDft.create(self.layout, dtype=volume.dtype, device=volume.device)
        with torch.no_grad():
            self.block = dft.volume(volume.detach())
        ky, kx = rfft2_grid(n, dtype=volume.dtype, device=volume.device)
        self.inside = kx * kx + ky * ky <= (n / 2) ** 2  # (N, N//2+1) bool
        self.kx, self.ky = kx[self.inside], ky[self.inside]
        scale = 1.0 / (n * self.pixel_size_a)
        self.ctf_grid = CtfGrid(self.kx.to(torch.float64) * scale,
                                self.ky.to(torch.float64) * scale)

    @property
    def n_points(self) -> int:
        return int(self.kx.shape[0])

    def scale_(self, factor: float) -> ProjectionModel:
        """Multiply the density (its spectrum) by `factor`, in place."""
        self.block = self.block * factor
        return self

    def spectra(self, rotations: Tensor, ctf: CtfParameters | None = None,
                shifts_px: Tensor | None = None) -> Tensor:
        """(B, M) complex coefficients at (kx, ky) of the images of rotations (B, 3, 3): slice
        times sqrt(N), times the CTF (if given), times the shift phase (if given)."""
        r = rotations.to(device=self.device, dtype=self.dtype)
        values = extract_slices(self.block, r, self.kx, self.ky, self.oversampling)
        values = values * math.sqrt(self.box_size)
        if ctf is not None:
            values = values * self.ctf_grid(ctf).to(device=self.device, dtype=self.dtype)
        if shifts_px is not None:
            t = shifts_px.to(device=self.device, dtype=self.dtype)
            phases = shift_phases(self.kx, self.ky, t, self.box_size)  # (B, M)
            values = values * phases.to(values.dtype)
        return values

    def images(self, rotations: Tensor, ctf: CtfParameters | None = None,
               shifts_px: Tensor | None = None) -> Tensor:
        """(B, N, N) real noise-free images (zero spectrum outside the Nyquist disc)."""
        return self.to_images(self.spectra(rotations, ctf, shifts_px))

    def to_images(self, values: Tensor) -> Tensor:
        """(B, N, N) real images of coefficients values (B, M) at (kx, ky), zero elsewhere."""
        n = self.box_size
        full = values.new_zeros(values.shape[0], n, n // 2 + 1)
        full[:, self.inside] = values
        return irfft2c(full, n)

    def particle_images(self, params: ParticleParameters) -> Tensor:
        return self.images(params.rotations, params.ctf, params.shifts_px)


def mean_signal_variance(model: ProjectionModel, params: ParticleParameters,
                         chunk_size: int = 256) -> float:
    """Mean over the particles of the variance of their noise-free images (whole box).

    The per-image variances are summed in one fixed order, so the result does not depend on
    the chunk size (beyond what the images themselves do)."""
    variances = []
    with torch.no_grad():
        for start in range(0, len(params), chunk_size):
            chunk = params.index(slice(start, start + chunk_size))
            images = model.particle_images(chunk)
            variances.append(images.to(torch.float64).var(dim=(-2, -1), unbiased=False).cpu())
    return float(torch.cat(variances).mean())


__all__ = [
    "SHIFT_TRUNCATION",
    "ParticleParameters",
    "ProjectionModel",
    "draw_particle_parameters",
    "mean_signal_variance",
    "noise_seeds",
    "particle_noise",
    "stream_generator",
    "truncated_normal_shifts",
]
