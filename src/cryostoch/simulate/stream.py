"""Streaming the simulated particles into their MRC stack, chunk by chunk (bounded memory)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cryostoch.io.stack_writer import StackWriter
from cryostoch.simulate.hazards import Hazards, hazard_images
from cryostoch.simulate.noise import colour_noise
from cryostoch.simulate.particles import (
    ParticleParameters,
    ProjectionModel,
    noise_seeds,
    particle_noise,
)

if TYPE_CHECKING:
    from cryostoch.simulate.run import SimulationConfig


def write_particle_stack(stack_path: Path, model: ProjectionModel, params: ParticleParameters,
                 hazards: Hazards, amplitude: torch.Tensor | None, config: SimulationConfig,
                 montage_k: int, progress: bool | None
                 ) -> tuple[float, dict[str, list[np.ndarray]], np.ndarray]:
    """Stream the noisy particles into the stack in chunks; `amplitude` (N, N//2+1): the
    coloured noise's sqrt(spectrum) (None: white).

    Returns the realised SNR, the first `montage_k` clean and noisy images and the summed
    noise-free image variances of each junk kind (4,).
    """
    from tqdm import tqdm

    n, box = config.n_particles, config.box_size
    compute = getattr(torch, config.compute_dtype)
    seeds = noise_seeds(config.seed, n)
    signal_sum = noise_sum = 0.0
    signal_by_kind = np.zeros(4)
    montage: dict[str, list[np.ndarray]] = {}
    writer = StackWriter(stack_path, n, box, np.dtype(config.dtype), config.pixel_size_a)
    bar = tqdm(total=n, unit="img", desc="simulate", disable=None if progress is None
               else not progress, dynamic_ncols=True)
    with writer, bar:
        for start in range(0, n, config.chunk_size):
            stop = min(n, start + config.chunk_size)
            chunk = params.index(slice(start, stop))
            with torch.no_grad():
                clean = hazard_images(model, chunk, hazards.index(slice(start, stop)),
                                      config.snr)
                noise = colour_noise(particle_noise(seeds[start:stop], box, dtype=compute,
                                                    device=model.device), amplitude)
                images = clean + noise
            variances = clean.to(torch.float64).var(dim=(-2, -1), unbiased=False).cpu()
            signal_sum += float(variances.sum())
            signal_by_kind += np.bincount(hazards.kinds[start:stop], weights=variances.numpy(),
                                          minlength=4)
            noise_sum += float(noise.to(torch.float64).var(dim=(-2, -1), unbiased=False).sum())
            if start < montage_k:
                k = min(montage_k, stop) - start
                montage.setdefault("clean", []).append(clean[:k].float().cpu().numpy())
                montage.setdefault("particles", []).append(images[:k].float().cpu().numpy())
            writer.write(start, images.cpu())
            del clean, noise, images
            bar.update(stop - start)
    return signal_sum / noise_sum, montage, signal_by_kind
