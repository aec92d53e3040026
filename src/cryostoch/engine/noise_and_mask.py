"""The run's noise model and solvent mask: state next to the map, updated at stage changes.

`NoiseAndMask` holds the noise spectrum (None for white noise) and the current solvent mask
(None for no mask), gives the likelihood its per-group precision at any cutoff, projects the
map onto the mask after every step, and lets the mask follow the map at every stage change
(`--mask auto`). Both go into checkpoints, so that a resumed run continues exactly.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from cryostoch.engine.distributed import ONE_PROCESS, World
from cryostoch.engine.prepare import PreparedRun
from cryostoch.evaluate.transform import soft_sphere_mask
from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.model.noise import NoiseSpectrum, residual_power, shell_means, updated_spectrum
from cryostoch.model.solvent import dynamic_mask, mask_fraction

log = logging.getLogger(__name__)

# training images per optics group used to re-estimate the noise
NOISE_SAMPLE = 1000


class NoiseAndMask:
    """Noise spectrum and solvent mask of one run (see the module docstring)."""

    def __init__(self, run: PreparedRun) -> None:
        config, geometry = run.config, run.geometry
        self.kind = config.mask
        self.threshold = config.mask_threshold
        self.noise: NoiseSpectrum | None = (run.particles.background_noise
                                            if config.noise_model == "coloured" else None)
        options = {"dtype": run.dtype, "device": run.device}
        self.sphere = soft_sphere_mask(geometry.box_size, geometry.particle_radius_px,
                                       edge_px=3.0, **options)
        if self.kind == "none":
            self.mask = None
        elif self.kind in ("auto", "sphere"):
            self.mask = self.sphere.clone()
        else:
            self.mask = run.given_mask.to(**options)
        if self.noise is not None:
            variance = self.noise.variance
            log.info("coloured noise: sigma^2 from %.3g (low frequencies) to %.3g (Nyquist), "
                     "%d optics group(s)", float(variance[:, 1].mean()),
                     float(variance[:, -1].mean()), self.noise.n_groups)

    def precision(self, model: MarginalLikelihood) -> Tensor | None:
        """(G, M) relative noise precision at `model`'s coefficients, or None (white)."""
        if self.noise is None:
            return None
        return self.noise.precision(model.coefficients, model.dtype)

    def apply_(self, volume: Tensor) -> None:
        """Multiply the map (N, N, N) by the mask in place (a projection after each step)."""
        if self.mask is not None:
            with torch.no_grad():
                volume.mul_(self.mask)

    def follow(self, volume: Tensor) -> None:
        """With --mask auto: a new mask from the current map (N, N, N), or one per class from
        (K, N, N, N)."""
        if self.kind != "auto":
            return
        if volume.dim() == 3:
            self.mask = dynamic_mask(volume, self.sphere, threshold_fraction=self.threshold)
        else:
            self.mask = torch.stack([dynamic_mask(v, self.sphere, threshold_fraction=self.threshold)
                                     for v in volume])
        log.info("solvent mask follows the map: %.1f%% of the box", 100 * mask_fraction(self.mask))

    def reestimate(self, run: PreparedRun, model: MarginalLikelihood, volume: Tensor,
                   class_log_weights: Tensor | None, world: World = ONE_PROCESS) -> None:
        """sigma^2 per shell and group from the expected residual |X - C S|^2 under the pose
        posterior of the current map (RELION's sigma2_noise update), on up to
        `NOISE_SAMPLE` training images per group, inside `model`'s cutoff (the current
        stage's, at temperature 1: beyond it the map holds no signal yet); shells beyond it
        keep their earlier estimate. Each rank of `world` sums the residuals of its share of
        the images; the sums are all-reduced."""
        if self.noise is None:
            return
        train = run.train
        precision = self.precision(model)  # (G, M)
        with torch.no_grad():
            slices = model.slices(volume.detach())
            for group in range(self.noise.n_groups):
                rows = torch.nonzero(train.optics_index == group).flatten()[:NOISE_SAMPLE]
                if len(rows) == 0:
                    continue
                residual = torch.zeros(model.n_points, dtype=torch.float64)
                for _, blocks, result in train.evaluate_chunks(
                        model, slices, world.share(rows), noise_precision=precision,
                        statistics=True,
                        class_log_weights=class_log_weights):
                    coeffs = model.image_coefficients(blocks)
                    image_power = (coeffs.real**2 + coeffs.imag**2).double().sum(0)
                    residual += residual_power(slices, *result.statistics, image_power,
                                               model.weights_k * precision[group]).cpu()
                world.sum_(residual)
                shells = shell_means(residual / len(rows), model.coefficients,
                                     self.noise.variance.shape[1])
                self.noise = updated_spectrum(self.noise, group, shells)
        variance = self.noise.variance
        log.info("noise re-estimated from the residuals: sigma^2 %.3g (low) to %.3g (cutoff)",
                 float(variance[:, 1].mean()),
                 float(variance[:, int(model.config.max_radius_px)].mean()))

    def state_dict(self) -> dict:
        return {"mask": None if self.mask is None else self.mask.detach().cpu(),
                "noise_variance": None if self.noise is None else self.noise.variance.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mask") is not None:
            self.mask = state["mask"].to(self.sphere)
        if state.get("noise_variance") is not None:
            self.noise = NoiseSpectrum(state["noise_variance"].to(torch.float64))

    def describe(self) -> dict:
        """What config.json records."""
        return {
            "noise_model": "white" if self.noise is None else "coloured",
            "noise_variance_per_shell": None if self.noise is None
            else [[round(float(v), 5) for v in row] for row in self.noise.variance],
            "mask": self.kind,
            "mask_fraction": None if self.mask is None else mask_fraction(self.mask),
        }
