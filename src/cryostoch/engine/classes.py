"""Several classes: class proportions, re-seeding of emptied classes, and each particle's class.

With `--classes K` the map is (K, N, N, N) and the likelihood marginalises the class with the
poses (`MarginalLikelihood`, class-major rows). Junk, ice and broken particles then have maps of
their own to go to instead of pulling the molecule's map towards a blob (as cryoSPARC's
multi-class ab initio does). At every stage change the proportions are measured from a sample
of training images (their most probable class) and a class left with almost no particles is
re-seeded from the largest one, slightly perturbed, so that no map is wasted.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.prepare import PreparedRun
from cryostoch.engine.preprocess import PreparedParticles
from cryostoch.model.likelihood import MarginalLikelihood

log = logging.getLogger(__name__)

# a class with less than this share of 1/K of the particles is re-seeded
RESEED_SHARE = 0.25
# images used to measure the proportions at a stage change
SAMPLE_SIZE = 1000


def most_probable_classes(model: MarginalLikelihood, volume: Tensor,
                          particles: PreparedParticles, rows: Tensor,
                          noise_precision: Tensor | None,
                          class_log_weights: Tensor | None) -> Tensor:
    """(n,) 0-based class of each particle `rows` (n,) at its most probable pose.

    volume: (K, N, N, N); noise_precision: (G, M) or None.
    """
    with torch.no_grad():
        slices = model.slices(volume.detach())
        return torch.cat([torch.zeros(0, dtype=torch.long)]  # no rows: a rank's empty share
                         + [model.class_of(result.best_pose_index).cpu()
                            for _, _, result in particles.evaluate_chunks(
                                model, slices, rows, noise_precision=noise_precision,
                                class_log_weights=class_log_weights)])


def class_shares(classes: Tensor, n_classes: int, world: World = ONE_PROCESS) -> Tensor:
    """(K,) float64 share of the particles in each class (0-based labels (n,)); with several
    ranks, of the labels of all ranks together."""
    counts = world.sum_(torch.bincount(classes, minlength=n_classes).to(torch.float64))
    return counts / counts.sum().clamp(min=1)


def update_classes(run: PreparedRun, model: MarginalLikelihood, volume: Tensor,
                   noise_precision: Tensor | None, log_weights: list[float],
                   generator: torch.Generator, world: World = ONE_PROCESS) -> list[float]:
    """New log proportions (K,) from a sample of training images (each rank of `world`
    classifies its share); re-seeds emptied classes in `volume` (K, N, N, N) in place, alike
    on every rank (`generator` is seeded alike)."""
    n_classes = volume.shape[0]
    sample = torch.arange(min(run.n_train, SAMPLE_SIZE))
    current = torch.tensor(log_weights, dtype=torch.float64)
    classes = most_probable_classes(model, volume, run.train, world.share(sample),
                                    noise_precision, current)
    shares = class_shares(classes, n_classes, world)
    log.info("class shares: %s", ", ".join(f"{100 * float(s):.0f}%" for s in shares))
    largest = int(shares.argmax())
    with torch.no_grad():
        for c in range(n_classes):
            if shares[c] < RESEED_SHARE / n_classes:
                noise = torch.randn(volume.shape[1:], generator=generator, dtype=torch.float64)
                scale = 0.1 * float(volume[largest].std())
                volume[c] = volume[largest] + (scale * noise).to(volume)
                shares[c] = shares[largest] = shares[largest] / 2
                log.info("class %d was emptied: re-seeded from class %d", c + 1, largest + 1)
    floor = 0.5 / (n_classes * max(len(sample), 1))  # no class gets probability 0
    shares = shares.clamp(min=floor)
    return [math.log(float(s)) for s in shares / shares.sum()]
