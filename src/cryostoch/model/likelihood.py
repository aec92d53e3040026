"""Marginal likelihood of particle images, its gradient and posterior (DESIGN.md, paper eq. 4).

For image i with CTF C_i, the negative log marginal likelihood over the quadrature
(directions d x in-plane angles p x shifts t, weights w_dpt) is

    nll_i = -log sum_dpt w_dpt exp(-E_idpt) + ||I_i||^2 / (2 s^2) + (n_dof / 2) log(2 pi s^2)
    E_idpt = (1 / s^2) [ 1/2 sum_k w_k C_ip(k)^2 |S_d(k)|^2
                         - Re sum_k w_k conj(X_ipt(k)) C_ip(k) S_d(k) ]

on the half-plane coefficients k inside the cutoff (twin weights w_k), where S_d is the psi = 0
central slice of direction d (the projection, sqrt(N) times the unitary volume spectrum),
X_ipt(k) = I_i(q) exp(+2 pi i q.t / N) is the image read at the rotated frequency q = Rz(psi_p) k
and un-shifted by t, and C_ip(k) = C_i(q).

`MarginalLikelihood` puts together the three parts, each in its own module: the volume side
(`SliceOperator`: volume -> slices and the adjoint back), the image side (`ImageOperator`:
blocks, rotated samples, CTF, shift phases) and the posterior kernel (`PosteriorKernel`: the
GEMMs, the log-sum-exp and the posterior-weighted sums). `nll_and_gradient` owns the whole
chain from a volume to its gradient. Images are processed in chunks so memory stays bounded
whatever the quadrature size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cryostoch.fourier.grids import HalfPlaneCoefficients, half_plane_coefficients
from cryostoch.geometry.poses import PoseGrid, pose_parameters
from cryostoch.geometry.quadrature import (
    OrientationQuadrature,
    ShiftQuadrature,
    default_shift_step_px,
    orientation_quadrature,
    shift_quadrature,
)
from cryostoch.model.image_operator import ImageOperator
from cryostoch.model.posterior import (
    OperandLayout,
    PosteriorKernel,
    PosteriorSums,
    model_operand,
)
from cryostoch.model.slice_operator import SliceOperator
from cryostoch.operators.ctf import CtfParameters


@dataclass(frozen=True)
class LikelihoodConfig:
    """What the likelihood needs to know; all lengths in pixels of the working box.

    max_radius_px: the cutoff radius in cycles per box (fraction of Nyquist * box / 2).
    shift_radius_px = 0 means no shift marginalisation (the paper's synthetic set).
    shift_sigma_px: standard deviation of the normal shift prior truncated to the disc
    (inf = uniform). memory_budget_mb bounds the largest temporary (energy chunk).
    """

    box_size: int
    pixel_size_a: float
    max_radius_px: float
    noise_sigma: float = 1.0
    volume_oversampling: int = 2
    image_oversampling: int = 2
    shift_radius_px: float = 0.0
    shift_step_px: float | None = None
    shift_sigma_px: float = math.inf
    memory_budget_mb: float = 256.0
    n_classes: int = 1

    def __post_init__(self) -> None:
        if self.box_size < 8:
            raise ValueError(f"box_size must be >= 8, got {self.box_size}")
        if not self.pixel_size_a > 0:
            raise ValueError(f"pixel_size_a must be positive, got {self.pixel_size_a}")
        if not 0 < self.max_radius_px <= self.box_size / 2 - 3:
            raise ValueError(
                f"max_radius_px must be in (0, box/2 - 3 = {self.box_size / 2 - 3}], "
                f"got {self.max_radius_px}"
            )
        if not self.noise_sigma > 0:
            raise ValueError("noise_sigma must be positive")
        if self.volume_oversampling < 1 or self.image_oversampling < 1:
            raise ValueError("oversampling factors must be >= 1")
        if self.shift_radius_px < 0 or (self.shift_step_px is not None and self.shift_step_px <= 0):
            raise ValueError("shift radius must be >= 0 and shift step > 0")
        if not self.shift_sigma_px > 0:
            raise ValueError("shift_sigma_px must be positive")
        if not self.memory_budget_mb > 0:
            raise ValueError("memory_budget_mb must be positive")
        if self.n_classes < 1:
            raise ValueError("n_classes must be >= 1")


@dataclass
class LikelihoodResult:
    """Per-image results of one evaluation (tensors on the model's device)."""

    nll: Tensor  # (B,) negative log marginal likelihood of each image
    best_pose_index: Tensor  # (B,) flat index (d * P + p) * T + t of the most probable point
    best_pose_probability: Tensor  # (B,) its posterior probability
    top_pose_index: Tensor | None = None  # (B, K) the K most probable points, best first
    top_pose_probability: Tensor | None = None  # (B, K) their posterior probabilities
    slice_gradient: Tensor | None = None  # (D, M) complex dL/dS of sum(nll) * gradient_scale
    statistics: tuple[Tensor, Tensor] | None = None  # EM: (sum r w C X (D,M), sum r w C^2 (D,M))
    extras: dict = field(default_factory=dict)


class MarginalLikelihood:
    """Quadrature, operators and constants for one configuration on one device and dtype."""

    def __init__(
        self,
        config: LikelihoodConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        orientations: OrientationQuadrature | None = None,
        shifts: ShiftQuadrature | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n, r = config.box_size, config.max_radius_px
        f64 = {"dtype": torch.float64, "device": self.device}

        self.coefficients: HalfPlaneCoefficients = half_plane_coefficients(n, r, **f64)
        self.orientations = orientations or orientation_quadrature(r, **f64)
        if shifts is None:
            step = config.shift_step_px or default_shift_step_px(n, r)
            shifts = shift_quadrature(config.shift_radius_px, step, config.shift_sigma_px, **f64)
        self.shifts = shifts
        self.direction_matrices = self.orientations.direction_matrices.to(**f64)
        # with K classes the model operand holds K * D rows (class-major), so the class is one
        # more latent variable summed over by the same GEMMs and log-sum-exp
        self.n_classes = config.n_classes
        self.grid = PoseGrid(config.n_classes * self.direction_matrices.shape[0],
                             int(self.orientations.inplane_angles_rad.shape[0]),
                             int(self.shifts.shifts_px.shape[0]))
        options = {"dtype": dtype, "device": self.device}
        self.volume_side = SliceOperator(n, r, config.volume_oversampling,
                                         self.direction_matrices, self.coefficients, **options)
        self.images = ImageOperator(n, config.pixel_size_a, r, config.image_oversampling,
                                    self.coefficients, self.orientations.inplane_angles_rad,
                                    self.shifts.shifts_px, **options)
        self.kernel = PosteriorKernel(self.grid, self.n_points, config.memory_budget_mb,
                                      **options)

        self.weights_k = self.images.weights_k  # (M,)
        log_w_d = torch.log(self.orientations.direction_weights.to(**f64)) - math.log(
            self.n_inplane
        )
        self.log_weights_pd = log_w_d.expand(self.n_inplane, -1).contiguous().to(dtype)  # (P, D)
        self.log_weights_t = self.shifts.log_weights.to(**f64).to(dtype)  # (T,)
        self.log_normaliser = (
            0.5
            * self.coefficients.degrees_of_freedom
            * math.log(2 * math.pi * config.noise_sigma**2)
        )

    # ----------------------------------------------------------------------------- sizes
    @property
    def complex_dtype(self) -> torch.dtype:
        return self.images.complex_dtype

    @property
    def n_directions(self) -> int:
        """Directions per class."""
        return self.grid.n_directions // self.n_classes

    @property
    def n_inplane(self) -> int:
        return self.grid.n_inplane

    @property
    def n_shifts(self) -> int:
        return self.grid.n_shifts

    @property
    def n_points(self) -> int:
        return self.coefficients.n_points

    @property
    def quadrature_size(self) -> int:
        return self.grid.size

    # ----------------------------------------------------------------------- data prep
    def image_blocks(self, images: Tensor) -> Tensor:
        """Real images (B, N, N) -> oversampled half spectrum blocks (B, 2h+1, h+1)."""
        return self.images.image_blocks(images)

    def crop_blocks(self, blocks: Tensor) -> Tensor:
        """Blocks made for a larger cutoff (same image oversampling) cut down to this model's."""
        return self.images.crop_blocks(blocks)

    def image_coefficients(self, blocks: Tensor) -> Tensor:
        """Unrotated, unshifted coefficients (B, M) of images on the exact DFT grid."""
        return self.images.image_coefficients(blocks)

    # --------------------------------------------------------------------- model side
    def slices(self, volume: Tensor) -> Tensor:
        """The psi = 0 projection spectra of a real volume (N, N, N) -> (D, M), or of one
        volume per class (K, N, N, N) -> (K * D, M), class-major."""
        if volume.dim() == 3:
            return self.volume_side.slices(volume)
        self._check_classes(volume)
        return torch.cat([self.volume_side.slices(v) for v in volume])

    def _check_classes(self, volume: Tensor) -> None:
        if volume.dim() != 4 or volume.shape[0] != self.n_classes:
            raise ValueError(f"expected {self.n_classes} class volumes, got shape "
                             f"{tuple(volume.shape)}")

    def nll_and_gradient(
        self,
        volume: Tensor,
        blocks: Tensor,
        ctf: CtfParameters,
        *,
        gradient_scale: float,
        preconditioner: Tensor | None = None,
        noise_precision: Tensor | None = None,
        class_log_weights: Tensor | None = None,
    ) -> tuple[LikelihoodResult, Tensor]:
        """Per-image NLLs and d(gradient_scale * sum_i nll_i)/dV, (N, N, N) real.

        volume: (N, N, N) real, or (K, N, N, N) with K classes (the gradient has its shape);
        blocks: (B, 2h+1, h+1) from `image_blocks()`; ctf: (B,).
        preconditioner: optional real weights on the volume's spectrum block (see
        `cryostoch.model.curvature.fourier_preconditioner`), applied to the gradient.
        noise_precision, class_log_weights: see `evaluate`.
        """
        with torch.no_grad():
            slices = self.slices(volume.detach())
        result = self.evaluate(slices, blocks, ctf, gradient_scale=gradient_scale,
                               noise_precision=noise_precision,
                               class_log_weights=class_log_weights)
        if volume.dim() == 3:
            return result, self.volume_side.volume_gradient(result.slice_gradient,
                                                            preconditioner)
        per_class = result.slice_gradient.view(self.n_classes, self.n_directions, -1)
        gradient = torch.stack([self.volume_side.volume_gradient(g, preconditioner)
                                for g in per_class])
        return result, gradient

    # ------------------------------------------------------------------------ evaluate
    def evaluate(
        self,
        slices: Tensor,
        blocks: Tensor,
        ctf: CtfParameters,
        *,
        gradient_scale: float | None = None,
        statistics: bool = False,
        noise_precision: Tensor | None = None,
        class_log_weights: Tensor | None = None,
        top_k: int = 1,
    ) -> LikelihoodResult:
        """Evaluate a batch of images against the slices of one volume.

        slices: (D, M), or (K * D, M) with K classes, from `slices()` (only values are used).
        blocks: (B, 2h+1, h+1) from `image_blocks()`; ctf: their CTF parameters.
        gradient_scale: if given, also return dL/dS for L = gradient_scale * sum_i nll_i.
        statistics: also return the posterior-weighted sums EM needs (with coloured noise they
        keep the precision weights: sum r w C X / sigma_k^2 and sum r w C^2 / sigma_k^2).
        noise_precision: (B, M) or (M,) relative precision 1 / sigma_k^2 of the noise at each
        coefficient (coloured noise, `cryostoch.model.noise`); None: white noise (all 1). The
        model's noise sigma (a posterior temperature) scales it further.
        class_log_weights: (K,) log prior probability of each class (None: uniform).
        top_k: also return the `top_k` most probable quadrature points of each image (the
        candidates of a coarse-to-fine search; ties in the kernel's order).
        """
        s = slices.detach().to(self.complex_dtype)
        blocks = self.crop_blocks(blocks)
        n_images = blocks.shape[0]
        layout = OperandLayout(self.n_points, fold_quadratic=self.n_shifts == 1)
        model_op, power = model_operand(s, self._log_row_weights(class_log_weights), layout)
        want_grad = gradient_scale is not None
        sums = None
        if want_grad or statistics:
            sums = PosteriorSums.zeros(self.grid.n_directions, self.n_points, dtype=self.dtype,
                                       device=self.device)
        nll = torch.empty(n_images, dtype=self.dtype, device=self.device)
        k = min(top_k, self.grid.size)
        top_index = torch.empty(n_images, k, dtype=torch.long, device=self.device)
        top_prob = torch.empty(n_images, k, dtype=self.dtype, device=self.device)
        image_chunk, dir_chunk = self.kernel.chunk_sizes(n_images)
        ctf_values = self.images.ctf_values(ctf)  # (B, P, M)
        inv_var = 1.0 / self.config.noise_sigma**2
        for start in range(0, n_images, image_chunk):
            stop = min(n_images, start + image_chunk)
            b = stop - start
            precision = inv_var
            if noise_precision is not None:
                chunk = noise_precision if noise_precision.dim() == 1 \
                    else noise_precision[start:stop]
                precision = inv_var * chunk.to(device=self.device, dtype=self.dtype)
            data_op, quad_lhs = self._data_operand(blocks[start:stop], ctf_values[start:stop],
                                                   layout, precision)
            lse, arg, top = self.kernel.run(data_op, quad_lhs, model_op, power, layout, b,
                                            dir_chunk, sums, top_k=k)
            quadratic, normaliser = self._data_term(blocks[start:stop], precision)
            nll[start:stop] = -lse + quadratic + normaliser
            top_index[start:stop] = arg
            top_prob[start:stop] = torch.exp(top - lse.unsqueeze(1))

        result = LikelihoodResult(nll, top_index[:, 0].contiguous(),
                                  top_prob[:, 0].contiguous())
        if top_k > 1:
            result.top_pose_index, result.top_pose_probability = top_index, top_prob
        if want_grad:
            result.slice_gradient = sums.slice_gradient(s, gradient_scale)
        if statistics:
            result.statistics = sums.em_statistics(inv_var)
        return result

    def _log_row_weights(self, class_log_weights: Tensor | None) -> Tensor:
        """(K * D,) log w_d / P (+ log pi_c with K classes) of every model-operand row."""
        log_w_d = self.log_weights_pd[0]
        if self.n_classes == 1:
            return log_w_d
        if class_log_weights is None:
            class_log_weights = torch.full((self.n_classes,), -math.log(self.n_classes))
        log_pi = class_log_weights.to(device=self.device, dtype=self.dtype)
        return (log_pi[:, None] + log_w_d[None, :]).reshape(-1)

    def _data_term(self, blocks: Tensor, precision: float | Tensor
                   ) -> tuple[Tensor, Tensor | float]:
        """(||I||^2 / (2 s^2) (b,), the Gaussian's log normaliser) of b cropped blocks.

        precision: 1 / s^2, a number (white) or (M,) / (b, M) per coefficient.
        """
        if not isinstance(precision, Tensor):
            return 0.5 * precision * self.images.data_norm(blocks), self.log_normaliser
        coeffs = self.images.image_coefficients(blocks)
        power = coeffs.real**2 + coeffs.imag**2  # (b, M)
        weighted = self.weights_k * precision  # (M,) or (b, M)
        normaliser = 0.5 * (self.weights_k * torch.log(2 * math.pi / precision)).sum(-1)
        return 0.5 * (power * weighted).sum(-1), normaliser

    def _data_operand(self, blocks: Tensor, ctf_values: Tensor, layout: OperandLayout,
                      precision: float | Tensor) -> tuple[Tensor, Tensor]:
        """Data operand (b*P*T, K) and quadratic factors q (b*P, M) of b images.

        blocks: (b, 2h+1, h+1); ctf_values: (b, P, M); precision: 1/s^2, a number (white
        noise) or per coefficient, (M,) or (b, M). The factors are w C / s^2 and
        w C^2 / (2 s^2).
        """
        b = blocks.shape[0]
        p_count, t_count, m = self.n_inplane, self.n_shifts, self.n_points
        terms = self.images.terms(blocks, ctf_values)
        if isinstance(precision, Tensor) and precision.dim() == 2:
            precision = precision.unsqueeze(1)  # (b, 1, M): the same for every angle
        quad_lhs = (terms.weighted_ctf2 * (0.5 * precision)).reshape(b * p_count, m)
        wc_scaled = (terms.weighted_ctf * precision).unsqueeze(2)
        if t_count == 1:  # no shift grid: the un-shift phases are all 1
            y = terms.rotated.unsqueeze(2)
        else:
            y = terms.rotated.unsqueeze(2) * self.images.unshift.unsqueeze(0)
        data_op = self.kernel.buffer("data", b * p_count * t_count, layout.width)
        view = data_op.view(b, p_count, t_count, -1)
        torch.mul(y.real, wc_scaled, out=view[..., layout.real])
        torch.mul(y.imag, wc_scaled, out=view[..., layout.imag])
        view[..., layout.direction_weight] = 1.0
        view[..., layout.shift_weight] = self.log_weights_t.repeat(p_count).view(p_count, t_count)
        if layout.fold_quadratic:
            view[..., layout.quadratic] = -quad_lhs.view(b, p_count, 1, m)
        return data_op, quad_lhs

    # --------------------------------------------------------------------------- poses
    def class_of(self, index: Tensor) -> Tensor:
        """(n,) flat pose indices -> (n,) 0-based class of each."""
        return self.grid.decode(index)[0] // self.n_directions

    def pose_parameters(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Flat pose indices -> RELION Euler angles (n, 3) degrees and shifts (n, 2) pixels."""
        d, p, t = self.grid.decode(index)
        within_class = self.grid.flat_index(d % self.n_directions, p, t)
        single = PoseGrid(self.n_directions, self.n_inplane, self.n_shifts)
        return pose_parameters(single, self.orientations, self.shifts, within_class)
