"""Score maps on held-out particles: does a map explain the images better than a blob?

A map can look plausible and still be no better, under the model, than a featureless density
with the same radial profile. The check a careful user runs: the held-out negative log
marginal likelihood per image (poses and shifts marginalised, the run's noise model) of each
map and of its spherical average. Maps come in arbitrary units, so each is first scaled to the
particles' signal power (as a start is) and then given the best of a grid of global scales.
With the seed and test size of a `reconstruct` run, the held-out particles are the ones that
run never trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from cryostoch.engine.checks import read_init_map
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.initial import data_signal_power, model_signal_power
from cryostoch.engine.noise_and_mask import NoiseAndMask
from cryostoch.engine.prepare import PreparedRun, prepare_run
from cryostoch.errors import InputError
from cryostoch.evaluate.shape import spherical_average

log = logging.getLogger(__name__)

# relative scales tried around the signal-power match (a factor 4 either way)
RELATIVE_SCALES = tuple(float(v) for v in np.geomspace(0.25, 4.0, 13))


@dataclass(frozen=True)
class MapScore:
    """Held-out NLL per image of a map and of its spherical average, each at its best scale."""

    path: str
    nll: float
    scale: float  # the factor the map was multiplied by
    blob_nll: float
    blob_scale: float

    @property
    def gain(self) -> float:
        """NLL per image the map's features gain over the blob (> 0: they explain the data)."""
        return self.blob_nll - self.nll


def best_scaled_nll(run: PreparedRun, volume: Tensor, noise_precision: Tensor | None,
                    target_power: float) -> tuple[float, float]:
    """(lowest held-out NLL per image, its scale) of `volume` (N, N, N) over RELATIVE_SCALES
    around the scale that matches the particles' signal power `target_power`."""
    volume = volume.to(run.device, run.dtype)
    power = model_signal_power(run.model, volume, run.train)
    if not (power > 0 and target_power > 0):
        raise InputError("--map", "the map has no signal inside the cutoff to score")
    base = math.sqrt(target_power / power)
    scored = [(run.test_nll(volume * (base * r), noise_precision), base * r)
              for r in RELATIVE_SCALES]
    return min(scored)


def score_maps(config: ReconstructionConfig, paths: list[str], *,
               progress: bool = True) -> list[MapScore]:
    """Score each map in `paths` (MRC files spanning the particles' box) and its blob."""
    if config.test_size < 1:
        raise InputError("--test-size", "scoring needs held-out particles (>= 1)")
    run = prepare_run(config, progress=progress)
    precision = NoiseAndMask(run).precision(run.model)
    target = data_signal_power(run.model, run.train, precision)
    scores = []
    for path in paths:
        volume = read_init_map(path, run.dataset.box_size, run.dataset.pixel_size_a,
                               run.geometry.box_size, hint="--map takes an MRC map")
        nll, scale = best_scaled_nll(run, volume, precision, target)
        blob_nll, blob_scale = best_scaled_nll(run, spherical_average(volume), precision,
                                               target)
        scores.append(MapScore(str(path), nll, scale, blob_nll, blob_scale))
        log.info("%s: held-out NLL %.3f per image (blob %.3f)", path, nll, blob_nll)
    return scores


def score_record(run_config: ReconstructionConfig, scores: list[MapScore]) -> dict:
    """What score.json holds."""
    return {"config": run_config.to_dict(),
            "maps": [dict(dataclasses.asdict(s), gain=s.gain) for s in scores]}


__all__ = ["MapScore", "RELATIVE_SCALES", "best_scaled_nll", "score_maps", "score_record"]
