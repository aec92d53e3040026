"""Closed-form map from back-projection sums: the M-step of both baselines.

Both baselines (iterative projection matching and batch EM) gather, for every quadrature
direction d and half-plane coefficient k inside the cutoff, the sums

    numerator_d(k)   = sum_i,p,t r_idpt * w_k * C_ip(k) * X_ipt(k)      (D, M) complex
    denominator_d(k) = sum_i,p,t r_idpt * w_k * C_ip(k)^2                (D, M) real

in the psi = 0 slice frame of each direction (`MarginalLikelihood.evaluate(...,
statistics=True)` with posterior responsibilities r, or `hard_statistics` with one-hot ones).
Under the model X = C * S_d + noise, with S_d = sqrt(N) * V_hat(A_d^T k) (the unitary volume
spectrum V_hat read on the central slice), the Gaussian-prior posterior mean of V_hat is

    V_hat(q) = sqrt(N) B[numerator](q) / (N B[denominator](q) + 2 sigma^2 / tau^2(|q|))

where B is trilinear back-projection into a 3-D half spectrum (`insert_slices` for the
numerator and `insert_slice_weights` for the denominator: the same kernel, so the ratio is a
local weighted average of the slice samples, as in RELION's reconstruction), followed by the
Hermitian fold of the kx = 0 plane. The factor 2 is the twin weight w_k = 2 that both sums
carry for every coefficient but k = 0 (each complex observation is counted twice), sigma is
the noise standard deviation (1 after normalisation) and tau^2 is the prior variance of a
unitary spectrum coefficient.

The regulariser tau^2 (`Regulariser`):
* "map" (default): tau^2(s) = fudge * mean |V_hat_current(k)|^2 over the integer shell
  s = round(|k|) of the current map: the power-spectrum prior RELION builds from its
  reference (`--tau2_fudge`, default 1). As in RELION, shells where the current map has no
  power (beyond a low-passed start) are not regularised, so the band can grow;
* "constant": one tau^2 for every coefficient;
* "none" (tau^2 = inf everywhere): the plain least-squares solution.
In every mode, coefficients with too little data and no prior are left at zero.

The back-projection runs on a grid oversampled `oversampling` times (default: the model's
volume oversampling), on which the trilinear kernel averages over +-1/oversampling of a
voxel; the integer-frequency points of that grid are the `rfft3c` spectrum of the map, which
`irfft3c` turns into the real volume. Only coefficients with |k| <= cutoff + 1 are estimated
(the central slices reach no further), and by default only those inside the model's cutoff
(`cutoff_px`): the likelihood sees nothing beyond it. The rest of the spectrum is zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.baselines.backprojection import (
    BackProjection,
    backproject_sums,
    backprojection_grid_shape,
    correct_gridding,
    gridded_backprojection,
    pooling_group,
)
from cryostoch.fourier.grids import radial_index
from cryostoch.fourier.transforms import irfft3c, rfft3c
from cryostoch.model.likelihood import MarginalLikelihood

__all__ = [
    "BackProjection",
    "REGULARISER_MODES",
    "Regulariser",
    "backproject_sums",
    "backprojection_grid_shape",
    "correct_gridding",
    "gridded_backprojection",
    "closed_form_map",
    "pooling_group",
    "refine_map",
    "shell_power",
    "solve_map",
]


@dataclass(frozen=True)
class Regulariser:
    """Choice of the Wiener prior variance tau^2 (see the module docstring).

    mode: "map" (tau^2 = fudge * per-shell power of the current map), "constant"
    (tau^2 = `tau2`) or "none" (no regularisation).
    """

    mode: str = "map"
    fudge: float = 1.0
    tau2: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in REGULARISER_MODES:
            raise ValueError(f"regulariser mode must be one of {', '.join(REGULARISER_MODES)}")
        if not (self.fudge > 0 and math.isfinite(self.fudge)):
            raise ValueError(f"tau2 fudge must be positive and finite, got {self.fudge}")
        if self.mode == "constant" and not (
            self.tau2 is not None and self.tau2 > 0 and math.isfinite(self.tau2)
        ):
            raise ValueError("a constant regulariser needs a positive, finite tau2")

    @staticmethod
    def parse(text: str | float, fudge: float = 1.0) -> Regulariser:
        """'map', 'none' or a positive number (a constant tau^2)."""
        if isinstance(text, str) and text.strip().lower() in ("map", "none"):
            return Regulariser(text.strip().lower(), fudge)
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"tau2 must be 'map', 'none' or a positive number, got {text!r}"
                             ) from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"tau2 must be positive and finite, got {text!r}")
        return Regulariser("constant", fudge, value)

    def describe(self) -> str:
        if self.mode == "map":
            return f"per-shell power of the current map x {self.fudge:g}"
        if self.mode == "constant":
            return f"constant tau^2 = {self.tau2:g}"
        return "none (least squares)"

    def tau2_per_shell(self, volume: Tensor | None, n_shells: int) -> Tensor | None:
        """tau^2 for integer shells 0 .. n_shells - 1 (float64; inf: no prior), or None."""
        if self.mode == "none":
            return None
        if self.mode == "constant":
            return torch.full((n_shells,), float(self.tau2), dtype=torch.float64)
        if volume is None:
            raise ValueError("a per-shell regulariser needs the current map")
        power = shell_power(volume)
        out = torch.full((n_shells,), math.inf, dtype=torch.float64, device=power.device)
        count = min(n_shells, power.shape[0])
        out[:count] = power[:count] * self.fudge
        # shells with no power (or only round-off, beyond a low-passed map's band): no prior
        out[out <= 1e-12 * float(out[torch.isfinite(out)].max().clamp(min=1e-300))] = math.inf
        return out


REGULARISER_MODES = ("map", "constant", "none")


def shell_power(volume: Tensor) -> Tensor:
    """Mean |V_hat(k)|^2 of the unitary spectrum on integer shells 0 .. N//2 (float64)."""
    n = volume.shape[-1]
    spectrum = rfft3c(volume.detach().to(torch.float64))
    shells = radial_index(n, half=True, ndim=3, device=volume.device)
    keep = shells <= n // 2
    size = n // 2 + 1
    power = torch.zeros(size, dtype=torch.float64, device=volume.device)
    power.index_add_(0, shells[keep], spectrum.abs().square()[keep])
    count = torch.zeros(size, dtype=torch.float64, device=volume.device)
    count.index_add_(0, shells[keep], torch.ones_like(spectrum.real)[keep])
    return power / count.clamp(min=1)


def _tau2_grid(back: BackProjection, tau2_per_shell: Tensor | None) -> Tensor:
    """tau^2 on the back-projection's coefficients: inf where there is no prior (None, inf,
    or shells beyond `tau2_per_shell`); 0 forces a coefficient to zero."""
    radius = back.radius
    if tau2_per_shell is None:
        return torch.full_like(radius, math.inf)
    tau2 = tau2_per_shell.to(device=radius.device, dtype=torch.float64)
    shell = radius.round().long()
    inside = shell < tau2.shape[0]
    return torch.where(inside, tau2[shell.clamp(max=tau2.shape[0] - 1)], math.inf)


def _precision(back: BackProjection, tau2: Tensor, noise_sigma: float, cutoff_px: float | None,
               relative_floor: float) -> tuple[Tensor, Tensor]:
    """(D, free): the diagonal D(q) = N den(q) / (2 sigma^2) + 1 / tau^2 of the M-step's
    Hessian in the unitary Fourier basis (the gridding approximation) and the mask of the
    coefficients that are estimated at all."""
    den = back.denominator / (2.0 * noise_sigma**2)
    prior = torch.where(torch.isinf(tau2), 0.0, 1.0 / torch.where(tau2 > 0, tau2, 1.0))
    precision = den + prior
    floor = relative_floor * float(den.max().clamp(min=1e-300))
    free = (tau2 > 0) & (precision > floor)
    if cutoff_px is not None:
        free &= back.radius <= cutoff_px + 1e-9
    return torch.where(free, precision, 1.0), free


def _to_volume(half: Tensor, back: BackProjection) -> Tensor:
    n, k = back.box_size, back.k_max
    spectrum = torch.zeros(n, n, n // 2 + 1, dtype=torch.complex128, device=half.device)
    c = n // 2
    spectrum[c - k : c + k + 1, c - k : c + k + 1, : k + 1] = half
    return irfft3c(spectrum, n)


def _from_volume(volume: Tensor, back: BackProjection) -> Tensor:
    n, k = back.box_size, back.k_max
    c = n // 2
    return rfft3c(volume.to(torch.float64))[c - k : c + k + 1, c - k : c + k + 1, : k + 1]


def solve_map(
    back: BackProjection,
    *,
    tau2_per_shell: Tensor | None = None,
    noise_sigma: float = 1.0,
    cutoff_px: float | None = None,
    relative_floor: float = 1e-6,
) -> Tensor:
    """The real (N, N, N) float64 map of the gridded Wiener estimate (module docstring).

    tau2_per_shell: tau^2 for integer shells round(|k|) (None, inf or shells beyond its
    length: no prior; 0: the coefficient is set to zero). Coefficients whose precision is
    below `relative_floor` times the largest data precision are left at zero.
    cutoff_px: if given, coefficients with |k| > cutoff_px are zeroed (a hard low-pass).
    """
    tau2 = _tau2_grid(back, tau2_per_shell)
    precision, free = _precision(back, tau2, noise_sigma, cutoff_px, relative_floor)
    rhs = back.numerator / (2.0 * noise_sigma**2)
    return _to_volume(torch.where(free, rhs / precision, 0.0), back)


def refine_map(
    volume: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    model: MarginalLikelihood,
    back: BackProjection,
    *,
    tau2_per_shell: Tensor | None = None,
    cutoff_px: float | None = None,
    iterations: int = 10,
    tolerance: float = 1e-4,
    relative_floor: float = 1e-6,
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Solve the M-step exactly by preconditioned conjugate gradients, starting at `volume`.

    Minimises, over real maps V whose spectrum lives on the coefficients the gridded
    estimate uses (those |k| <= k_max it covers),

        Q(V) = 1/(2 sigma^2) sum_d,k [den_d(k) |S_d(k)|^2 - 2 Re(conj(num_d(k)) S_d(k))]
               + 1/2 sum_q |V_hat(q)|^2 / tau^2(|q|),       S = model.slices(V),

    the expected complete-data negative log posterior with the model's own slice operator
    (oversampled pruned DFT and trilinear reads). The gridded estimate averages slice samples
    over the interpolation kernel, a slight blur that compounds over iterations; these few
    CG steps remove it. The preconditioner is the gridded diagonal D(q) (`solve_map`), so
    the first step reproduces the gridded estimate and a handful of steps converge.
    Gradients come from autograd through `model.slices`. Returns float64 (N, N, N).

    symmetrize: for a point group of order G > 1, the map's group average (a callable with a
    `group` attribute, as the run's `Symmetrizer`), and `back` pooled over that group
    (`backproject_sums(symmetry=...)`). Q is then minimised over symmetric maps: every
    gradient and search direction is averaged over the group, so the (symmetric) start stays
    symmetric, and the prior counts each orbit of coefficients once (1 / (G tau^2) per
    coefficient), the prior of the pooled `solve_map`, whose diagonal stays the
    preconditioner. None (or C1): the plain problem, unchanged.
    """
    sigma2 = model.config.noise_sigma**2
    symmetry = pooling_group(symmetrize)
    order = 1 if symmetry is None else symmetry.shape[0]
    tau2 = _tau2_grid(back, tau2_per_shell)
    precision, free = _precision(back, tau2, model.config.noise_sigma, cutoff_px,
                                 relative_floor)
    prior = torch.where(free & ~torch.isinf(tau2), 1.0 / torch.where(tau2 > 0, tau2, 1.0), 0.0)
    if order > 1:
        prior = prior / order

    def average(v: Tensor) -> Tensor:  # onto symmetric maps (nothing to do for C1)
        return symmetrize(v) if order > 1 else v
    cdtype = model.complex_dtype
    num = numerator.to(device=model.device, dtype=cdtype)
    den = denominator.to(device=model.device, dtype=model.dtype)

    def project(v: Tensor) -> Tensor:  # keep only the free coefficients
        return average(_to_volume(torch.where(free, _from_volume(v, back), 0.0), back))

    def precondition(r: Tensor) -> Tensor:
        return average(_to_volume(torch.where(free, _from_volume(r, back) / precision, 0.0),
                                  back))

    def gradient(v: Tensor) -> Tensor:
        """dQ/dV at v (float64), projected on the free coefficients."""
        with torch.enable_grad():
            x = v.to(device=model.device, dtype=model.dtype).detach().requires_grad_(True)
            s = model.slices(x)
            loss = (den * (s.real**2 + s.imag**2) - 2 * (num.conj() * s).real).sum()
            (grad,) = torch.autograd.grad(loss * (0.5 / sigma2), x)
        prior_grad = _to_volume(_from_volume(v, back) * prior, back)
        return project(grad.to(torch.float64) + prior_grad)

    x = project(volume.to(device=model.device, dtype=torch.float64))
    return _conjugate_gradients(x, gradient, precondition, iterations, tolerance)


def _conjugate_gradients(x: Tensor, gradient: Callable[[Tensor], Tensor],
                         precondition: Callable[[Tensor], Tensor], iterations: int,
                         tolerance: float) -> Tensor:
    """Preconditioned CG on the quadratic whose gradient is `gradient`, from x."""
    b = -gradient(torch.zeros_like(x))
    r = b - (gradient(x) + b)  # = -grad Q(x)
    z = precondition(r)
    p = z
    rz = float((r * z).sum())
    start = rz
    for _ in range(iterations):
        if not rz > 0 or rz <= tolerance**2 * start:
            break
        hp = gradient(p) + b
        curvature = float((p * hp).sum())
        if not curvature > 0:
            break
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * hp
        z = precondition(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def closed_form_map(
    numerator: Tensor,
    denominator: Tensor,
    model: MarginalLikelihood,
    *,
    regulariser: Regulariser | None = None,
    current: Tensor | None = None,
    oversampling: int | None = None,
    cutoff_px: float | None = None,
    refine_iterations: int = 10,
    symmetrize: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Map (N, N, N) in the model's dtype from per-direction sums: back-project, solve the
    gridded estimate, then refine it with `refine_iterations` CG steps (`refine_map`; 0 keeps
    the gridded estimate). `current` is the map the per-shell regulariser takes its power
    spectrum from. `cutoff_px` (default: the model's cutoff radius) zeroes the coefficients
    beyond it; pass `math.inf` to keep everything the slices reach.

    symmetrize: the run's `Symmetrizer` (a callable averaging a map over its point group,
    with a `group` attribute), or None. For a group of order > 1 the sums are pooled over the
    group before the solve (`gridded_backprojection`) and the CG steps stay on symmetric maps
    (`refine_map`): the sums of poses in one asymmetric unit, as the quadrature's are under a
    point group, then fill every symmetry mate. Averaging a map solved without the group
    instead mixes each coefficient with unobserved (zero) mates. C1 or None: no change.
    """
    regulariser = regulariser or Regulariser()
    if cutoff_px is None:
        cutoff_px = model.config.max_radius_px
    symmetry = pooling_group(symmetrize)
    symmetrize = symmetrize if symmetry is not None else None
    back = backproject_sums(numerator, denominator, model, oversampling=oversampling,
                            symmetry=symmetry)
    tau2 = regulariser.tau2_per_shell(current, back.k_max + 2)
    volume = solve_map(back, tau2_per_shell=tau2, noise_sigma=model.config.noise_sigma,
                       cutoff_px=cutoff_px)
    if refine_iterations > 0:
        volume = refine_map(volume, numerator, denominator, model, back, tau2_per_shell=tau2,
                            cutoff_px=cutoff_px, iterations=refine_iterations,
                            symmetrize=symmetrize)
    return volume.to(model.dtype)

