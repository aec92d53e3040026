"""The run's schedule: cutoff radius and posterior temperature as functions of images seen.

A pure function of the configuration and the position in the run, so that a resumed run, the
metrics and the baselines all see the same stages. The step size is measured again whenever
the stage changes (a new cutoff or temperature has another curvature).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryostoch.engine.config import DEFAULT_MIN_STEPS, ReconstructionConfig


def run_epochs(config: ReconstructionConfig, n_train: int) -> float:
    """The configured epochs, or by default one epoch and at least DEFAULT_MIN_STEPS
    minibatch steps (many epochs of a small data set, one of a large one)."""
    if config.epochs is not None:
        return config.epochs
    return max(1.0, DEFAULT_MIN_STEPS * config.effective_batch_size / n_train)


@dataclass(frozen=True)
class Stage:
    """What the likelihood uses for the next minibatch."""

    radius_px: float  # cutoff radius in Fourier pixels of the working box
    temperature: float  # posterior temperature (the model's noise sigma is sqrt(T))

    def key(self) -> list[float]:
        """The form a checkpoint stores (a list of Python floats)."""
        return [self.radius_px, self.temperature]


@dataclass(frozen=True)
class Schedule:
    """Frequency marching and tempering over the first `marching_fraction` of the run.

    The objective is well behaved while the low frequencies are right (paper, section 3.1), so
    the cutoff starts at `start_freq_fraction` of the final one and rises geometrically over
    `marching_stages` equal stages spanning the first `marching_fraction` of the run; the
    temperature falls from `start_temperature` to 1 in the same stages. The rest of the run is
    at the final cutoff and temperature 1.
    """

    final_radius_px: float
    total_images: int
    start_freq_fraction: float
    marching_fraction: float
    marching_stages: int
    start_temperature: float

    @staticmethod
    def from_config(config: ReconstructionConfig, final_radius_px: float, n_train: int
                    ) -> Schedule:
        return Schedule(final_radius_px, int(round(run_epochs(config, n_train) * n_train)),
                        config.start_freq_fraction, config.marching_fraction,
                        config.marching_stages, config.start_temperature)

    @property
    def _span(self) -> float:
        return self.marching_fraction * self.total_images

    def radius_px(self, images_seen: int) -> float:
        final = self.final_radius_px
        start = max(min(final, 3.0), final * self.start_freq_fraction)
        span = self._span
        if start >= final or span <= 0 or images_seen >= span or self.marching_stages == 1:
            return final
        stage = int(images_seen / span * self.marching_stages)
        return start * (final / start) ** (stage / self.marching_stages)

    def temperature(self, images_seen: int) -> float:
        span = self._span
        if self.start_temperature == 1 or span <= 0 or images_seen >= span:
            return 1.0
        stage = int(images_seen / span * self.marching_stages)
        return self.start_temperature ** (1 - stage / self.marching_stages)

    def stage(self, images_seen: int) -> Stage:
        """The stage of the minibatch that starts after `images_seen` training images."""
        return Stage(self.radius_px(images_seen), self.temperature(images_seen))
