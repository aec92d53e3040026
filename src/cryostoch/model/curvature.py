"""Expected curvature of the data term on the volume's spectrum block, and the preconditioner.

With the posterior spread evenly over the quadrature (the start of a run, and the average over
poses later), the Hessian of the mean image term with respect to the spectrum block is
J^T diag(w_d w_k C^2 / s^2) J, with J the trilinear slice extraction. Its row sums (the
"lumped" diagonal) are the CTF^2-weighted coverage of the block by central slices, the EM
"denominator"; they bound the true diagonal from above (trilinear weights a <= 1 enter as a,
not a^2) and equal it where slices fall on grid points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryostoch.model.likelihood import MarginalLikelihood
from cryostoch.operators.ctf import CtfParameters
from cryostoch.operators.slicing import insert_slice_weights


def expected_curvature(model: MarginalLikelihood, ctf: CtfParameters,
                       noise_precision: Tensor | None = None) -> Tensor:
    """Row sums of the data term's expected Hessian, real (Kz, Ky, Kx) on the spectrum block.

    ctf: the particles to average C^2 over; noise_precision: optional (M,) mean relative
    precision 1 / sigma_k^2 of their noise (coloured noise). Computed by back-projecting
    N * w_d * w_k * mean C^2 / s^2 with the same trilinear kernel as the slice extraction.
    """
    c2 = model.images.mean_ctf2(ctf)  # (M,) float64
    if noise_precision is not None:
        c2 = c2 * noise_precision.to(c2)
    weights = model.orientations.direction_weights.to(model.device, torch.float64)
    per_point = weights[:, None] * (model.coefficients.weights * c2)[None, :]
    config = model.config
    coverage = insert_slice_weights(
        per_point * config.box_size / config.noise_sigma**2,
        model.direction_matrices,
        model.coefficients.kx,
        model.coefficients.ky,
        model.volume_side.block_shape,
        config.volume_oversampling,
    )
    return coverage.to(model.dtype)


def fourier_preconditioner(curvature: Tensor, relative_floor: float = 0.05) -> Tensor:
    """P(k) = H(k) / (H(k)^2 + (floor * max H)^2), scaled so that P = 1/H where H is largest.

    Approximately 1/H where the expected curvature H is well above the floor (so every
    covered frequency moves at a comparable rate) and going to 0 where nothing is measured
    (block entries beyond the cutoff), so the step stays bounded there.
    """
    h = curvature.clamp(min=0)
    floor = relative_floor * h.max()
    p = h / (h * h + floor * floor)
    return p * h.max()


def gauss_newton_scale(model: MarginalLikelihood, weights: Tensor,
                       preconditioner: Tensor | None = None, *, iterations: int = 30,
                       generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of the data term's Gauss-Newton curvature, by power iteration.

    weights: (K * D, M) real, the posterior-weighted sum_i r w_k C^2 / s^2 of a minibatch (EM's
    second statistic) divided by its size: the curvature is then G = J^T diag(weights) J, the
    posterior mean of every pose's own Hessian (`expected_curvature`'s lumped form is its row
    sums with the posterior spread evenly). preconditioner: as in `minibatch_objective`, so
    the result is the largest eigenvalue of P G (similar to P^1/2 G P^1/2, so real and >= 0).

    Why not the Hessian itself: the marginal over poses adds -Cov_posterior(pose gradients),
    a negative curvature that grows with the information per image (4x at box 128 and
    2.8 A/px against box 64 and 5.6 A/px at the same SNR per pixel), and a finite-difference
    ||H u|| along the gradient mixes it in; but gradient descent is only unstable along
    positive curvature, bounded by G (H = G - Cov <= G). G needs no image data once the
    posterior sums are known, so the iteration costs slice extractions only.
    """
    n_classes = weights.shape[0] // model.n_directions
    w = weights.to(model.dtype).view(n_classes, model.n_directions, -1)
    n = model.config.box_size
    x = torch.randn((n_classes, n, n, n), generator=generator, dtype=torch.float64)
    x = x.to(device=model.device, dtype=model.dtype)
    x = x / x.norm()
    scale = 0.0
    for _ in range(iterations):
        # G x per class: slices, times the weights (d/dS of 1/2 sum w |S|^2 in torch's complex
        # convention is w S), inserted back through the adjoint (and the preconditioner)
        y = torch.stack([model.volume_side.volume_gradient(
            w[c] * model.volume_side.slices(x[c]), preconditioner) for c in range(n_classes)])
        scale = float(y.norm())
        if not scale > 0.0:
            return 0.0
        x = y / scale
    return scale
