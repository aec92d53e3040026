"""The curvature scale L that sets the calibrated step (base_lr = c_method / L).

Why not the optimisers' own finite difference ||H u|| along the gradient (their fallback, see
`cryostoch.optim.calibration`): the objective marginalises the pose, so its Hessian is
G - Cov, with G the posterior mean of every pose's Gauss-Newton curvature and Cov >= 0 the
posterior covariance of the poses' gradients. Cov grows with the information each image
carries about its pose, so along the gradient of a random start ||H u|| was dominated by it.
Measured on the built-in phantom with real CTFs, paper-faithful SGD, the same object and
cutoff radius (6.4 Fourier pixels), 100 images, SNR 0.05 per pixel:

    box 64 at 5.6 A/px:  ||H u|| 1.75, <u, H u> +0.22, largest |eigenvalue| 4.5 (negative),
                         largest positive eigenvalue 2.0 (power iterations on H + 4.2 I)
    box 128 at 2.8 A/px: ||H u|| 8.6,  <u, H u> -1.03, largest |eigenvalue| 14.6 (negative),
                         largest positive eigenvalue 4.7

(the same SNR per pixel is 4x the SNR per Fourier coefficient inside the cutoff at the finer
sampling, hence the larger Cov). The step 1 / ||H u|| thus fell 4.9x from box 64 to 128 while
the stable step (< 2 / positive eigenvalue) fell 2.4x. Gradient descent only diverges along
positive curvature, which G bounds from above (H <= G). G scales with the box size N (a
projection sums N voxels) and otherwise depends on the CTF, the quadrature and how sharp the
posteriors are, so for the same physical problem N * step stays about the same (measured:
largest G eigenvalue 2.70 and 6.44, 1.3x the largest positive eigenvalue at both boxes).
L = the largest eigenvalue of G on the stage's first minibatch: one likelihood evaluation for
its posterior sums (counted as a gradient evaluation, as the finite difference was) and power
iterations that only extract and insert slices; the optimisers then take 2 c / L
(`optim/base.py`, BOUND_GAIN).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryostoch.engine.distributed import World
from cryostoch.engine.prepare import PreparedRun
from cryostoch.model.curvature import gauss_newton_scale
from cryostoch.model.likelihood import MarginalLikelihood


def posterior_curvature_weights(prepared: PreparedRun, model: MarginalLikelihood,
                                volume: Tensor, rows: np.ndarray, world: World, *,
                                noise_precision: Tensor | None,
                                class_log_weights: Tensor | None) -> Tensor:
    """(K * D, M) real: sum_i r w_k C^2 / sigma_k^2 over the minibatch `rows`, divided by its
    size (the Gauss-Newton weights of the mean data term, `gauss_newton_scale`).

    noise_precision: (G, M) per optics group or None (white). Under torchrun each rank sums
    its share and the sums are all-reduced.
    """
    index = world.share(torch.as_tensor(rows))
    with torch.no_grad():
        slices = model.slices(volume.detach())
        total = None
        for _, _, result in prepared.train.evaluate_chunks(
                model, slices, index, noise_precision=noise_precision,
                class_log_weights=class_log_weights, statistics=True):
            part = result.statistics[1]
            total = part if total is None else total + part
    if total is None:  # this rank's share is empty
        total = torch.zeros(model.grid.n_directions, model.n_points, dtype=model.dtype,
                            device=model.device)
    return world.sum_(total) / len(rows)


def gauss_newton_curvature(prepared: PreparedRun, model: MarginalLikelihood, volume: Tensor,
                           rows: np.ndarray, world: World, *, preconditioner: Tensor | None,
                           noise_precision: Tensor | None, class_log_weights: Tensor | None,
                           seed: int) -> float:
    """L: the largest eigenvalue of the (preconditioned) Gauss-Newton curvature of the mean
    data term on the minibatch `rows` at `volume` (see the module docstring)."""
    weights = posterior_curvature_weights(prepared, model, volume, rows, world,
                                          noise_precision=noise_precision,
                                          class_log_weights=class_log_weights)
    generator = torch.Generator().manual_seed(seed)  # every rank iterates identically
    return gauss_newton_scale(model, weights, preconditioner, generator=generator)
