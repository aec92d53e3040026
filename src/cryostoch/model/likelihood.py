"""Marginal likelihood of particle images, its gradient and posterior (DESIGN.md, paper eq. 4).

For image i with CTF C_i, the negative log marginal likelihood over the quadrature
(directions d x in-plane angles p x shifts t, weights w_dpt) is

    nll_i = -log sum_dpt w_dpt exp(-E_idpt) + ||I_i||^2 / (2 s^2) + (n_dof / 2) log(2 pi s^2)
    E_idpt = (1 / s^2) [ 1/2 sum_k w_k C_ip(k)^2 |S_d(k)|^2
                         - Re sum_k w_k conj(X_ipt(k)) C_ip(k) S_d(k) ]

on the half-plane coefficients k inside the cutoff (twin weights w_k), where S_d is the psi = 0
central slice of direction d (the projection, sqrt(N) times the unitary volume spectrum),
X_ipt(k) = I_i(q) exp(+2 pi i q.t / N) is the image read at the rotated frequency q = Rz(psi_p) k
and un-shifted by t (see `cryostoch.operators.inplane`), and C_ip(k) = C_i(q). The two data
terms are real matrix products of (images x angles x shifts) by (directions) over the frequency
axis, so a minibatch costs a few GEMMs, one log-sum-exp, one slice extraction and (through
autograd) one insertion. Directions and images are processed in chunks so memory stays bounded
whatever the quadrature size; the log-sum-exp is accumulated stably across chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cryostoch.fourier.grids import HalfPlaneCoefficients, half_plane_coefficients
from cryostoch.fourier.spectrum import PrunedDft, SpectrumLayout
from cryostoch.geometry.quadrature import (
    OrientationQuadrature,
    ShiftQuadrature,
    default_shift_step_px,
    orientation_quadrature,
    shift_quadrature,
)
from cryostoch.operators.ctf import CtfGrid, CtfParameters, evaluate_ctf
from cryostoch.operators.inplane import (
    cubic_interpolation_matrix,
    hermitian_extend,
    inplane_sample_points,
    sample_blocks,
)
from cryostoch.operators.shift import shift_phases
from cryostoch.operators.slicing import slice_points_3d, trilinear_stencil


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


@dataclass
class LikelihoodResult:
    """Per-image results of one evaluation (tensors on the model's device)."""

    nll: Tensor  # (B,) negative log marginal likelihood of each image
    best_pose_index: Tensor  # (B,) flat index (d * P + p) * T + t of the most probable point
    best_pose_probability: Tensor  # (B,) its posterior probability
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

        # Volume side: an oversampled spectrum block just large enough for trilinear reads.
        vol_os = config.volume_oversampling
        self.volume_layout = SpectrumLayout(n, r + 1.0 / vol_os + 1e-6, vol_os)
        self.volume_dft = PrunedDft.create(self.volume_layout, dtype=dtype, device=self.device)
        self.direction_matrices = self.orientations.direction_matrices.to(**f64)

        # Image side: blocks large enough for cubic reads at every rotated point.
        img_os = config.image_oversampling
        self.image_layout = SpectrumLayout(n, r + 2.5 / img_os + 1e-6, img_os)
        self.image_dft = PrunedDft.create(self.image_layout, dtype=dtype, device=self.device)
        angles = self.orientations.inplane_angles_rad.to(**f64)
        qx, qy = inplane_sample_points(self.coefficients.kx, self.coefficients.ky, angles)
        self.interpolation = cubic_interpolation_matrix(
            qx, qy, self.image_layout.half_width, img_os
        ).to(dtype)
        scale = 1.0 / (n * config.pixel_size_a)
        self.rotated_freq_x_per_a = (qx * scale).unsqueeze(0)  # (1, P, M) float64 for the CTF
        self.rotated_freq_y_per_a = (qy * scale).unsqueeze(0)
        self.ctf_grid = CtfGrid(qx * scale, qy * scale)  # CTF of any particle at (P, M)
        # un-shift phases exp(+2 pi i q.t / N), laid out (P, T, M)
        phases = shift_phases(qx, qy, self.shifts.shifts_px.to(**f64), n).conj()
        self.unshift = phases.permute(1, 0, 2).contiguous().to(self._complex)

        # Exact-grid positions of the coefficients in an image block (for ||I||^2 in the disc).
        h = self.image_layout.half_width
        self._grid_rows = (self.coefficients.ky * img_os + h).long()
        self._grid_cols = (self.coefficients.kx * img_os).long()

        self.weights_k = self.coefficients.weights.to(dtype)  # (M,)
        log_w_d = torch.log(self.orientations.direction_weights.to(**f64)) - math.log(
            self.n_inplane
        )
        self.log_weights_pd = log_w_d.expand(self.n_inplane, -1).contiguous().to(dtype)  # (P, D)
        self.log_weights_t = self.shifts.log_weights.to(**f64).to(dtype)  # (T,)
        self._workspace: dict[tuple, Tensor] = {}
        self._stencil: tuple[Tensor, Tensor, Tensor] | None = None
        self.log_normaliser = (
            0.5
            * self.coefficients.degrees_of_freedom
            * math.log(2 * math.pi * config.noise_sigma**2)
        )

    # ----------------------------------------------------------------------------- sizes
    @property
    def _complex(self) -> torch.dtype:
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    @property
    def n_directions(self) -> int:
        return int(self.direction_matrices.shape[0])

    @property
    def n_inplane(self) -> int:
        return int(self.orientations.inplane_angles_rad.shape[0])

    @property
    def n_shifts(self) -> int:
        return int(self.shifts.shifts_px.shape[0])

    @property
    def n_points(self) -> int:
        return self.coefficients.n_points

    @property
    def quadrature_size(self) -> int:
        return self.n_directions * self.n_inplane * self.n_shifts

    def gemm_flops_per_image(self, with_gradient: bool = True) -> float:
        """Multiply-adds x 2 of the GEMMs that one image costs in an exhaustive evaluation."""
        d, p, t, m = self.n_directions, self.n_inplane, self.n_shifts, self.n_points
        forward = 2 * (p * t * 2 * m * d + p * m * d)
        return float(forward * (2 if with_gradient else 1))

    def dft_gemm_flops(self, with_gradient: bool = True) -> float:
        """FLOPs of the pruned volume DFT's GEMMs per evaluation (independent of batch size)."""
        n = self.config.box_size
        k, kx = self.volume_layout.centred_length, self.volume_layout.half_length
        forward = 2 * n**3 * 2 * kx + 8 * k * n * n * kx + 8 * k * n * k * kx
        return float(forward * (2 if with_gradient else 1))

    # ----------------------------------------------------------------------- data prep
    def image_blocks(self, images: Tensor) -> Tensor:
        """Real images (B, N, N) -> oversampled half spectrum blocks (B, 2h+1, h+1)."""
        if images.shape[-1] != self.config.box_size or images.shape[-2] != self.config.box_size:
            raise ValueError(f"images must be {self.config.box_size} x {self.config.box_size}")
        return self.image_dft.images(images.to(device=self.device, dtype=self.dtype))

    def crop_blocks(self, blocks: Tensor) -> Tensor:
        """Blocks made for a larger cutoff (same image oversampling) cut down to this model's."""
        h = self.image_layout.half_width
        big = (blocks.shape[-2] - 1) // 2
        if big < h:
            raise ValueError("image blocks are smaller than this model's cutoff needs")
        if big == h:
            return blocks
        return blocks[..., big - h : big + h + 1, : h + 1]

    def image_coefficients(self, blocks: Tensor) -> Tensor:
        """Unrotated, unshifted coefficients (B, M) of images on the exact DFT grid."""
        blocks = self.crop_blocks(blocks)
        return blocks[:, self._grid_rows, self._grid_cols]

    # --------------------------------------------------------------------- model side
    def slices(self, volume: Tensor) -> Tensor:
        """The psi = 0 projection spectra S_d (D, M) of a real volume; differentiable."""
        return self.slices_from_block(self.volume_dft.volume(volume))

    def slices_from_block(self, block: Tensor) -> Tensor:
        """Slices from the volume's oversampled spectrum block (see `volume_dft`).

        Trilinear reads as `extract_slices` does, with the stencil (which depends only on the
        quadrature) computed once; autograd's backward is the matching insertion.
        """
        if self._stencil is None:
            points = slice_points_3d(
                self.direction_matrices, self.coefficients.kx, self.coefficients.ky
            )
            idx, w, flip = trilinear_stencil(
                points, tuple(block.shape), self.config.volume_oversampling
            )
            scale = math.sqrt(self.config.box_size)
            self._stencil = (idx.reshape(-1), (w * scale).to(self.dtype), flip)
        idx, w, flip = self._stencil
        values = (block.reshape(-1)[idx].reshape(w.shape) * w).sum(-1)
        return torch.where(flip, values.conj(), values)

    def expected_curvature(self, ctf: CtfParameters) -> Tensor:
        """Diagonal of the data term's expected Hessian on the volume's spectrum block.

        With the posterior spread evenly over the quadrature (the start of a run, and the
        average over poses later), the Hessian of the mean image term with respect to the
        block is the CTF^2-weighted coverage of the block by central slices: the EM
        "denominator". Computed by back-projecting N * w_d * w_k * mean C^2 with the same
        trilinear kernel as the extraction; shape (Kz, Ky, Kx), real.
        """
        from cryostoch.operators.slicing import insert_slice_weights

        c2 = evaluate_ctf(
            ctf.to(device=self.device), self.rotated_freq_x_per_a, self.rotated_freq_y_per_a
        ).pow(2).mean((0, 1))  # (M,)
        weights = self.orientations.direction_weights.to(self.device, torch.float64)
        per_point = weights[:, None] * (self.coefficients.weights * c2)[None, :]
        block_shape = (self.volume_layout.centred_length,) * 2 + (self.volume_layout.half_length,)
        coverage = insert_slice_weights(
            per_point * self.config.box_size / self.config.noise_sigma**2,
            self.direction_matrices,
            self.coefficients.kx,
            self.coefficients.ky,
            block_shape,
            self.config.volume_oversampling,
        )
        return coverage.to(self.dtype)

    # ------------------------------------------------------------------------ evaluate
    def _chunk_sizes(self, n_images: int) -> tuple[int, int]:
        """(images per chunk, directions per chunk) so the energy block fits the budget."""
        budget = self.config.memory_budget_mb * 2**20 / (torch.finfo(self.dtype).bits // 8)
        rows_per_image = self.n_inplane * self.n_shifts
        per_image = rows_per_image * max(self.n_directions, 2 * self.n_points + 3)
        image_chunk = max(1, min(n_images, int(budget // per_image)))
        dir_chunk = max(1, min(self.n_directions, int(budget // (image_chunk * rows_per_image))))
        return image_chunk, dir_chunk

    def _buffer(self, name: str, rows: int, cols: int) -> Tensor:
        """A reused scratch matrix: fresh multi-megabyte tensors cost page faults every call."""
        key = (name, rows, cols)
        buf = self._workspace.get(key)
        if buf is None:
            if len(self._workspace) > 8:
                self._workspace.clear()
            buf = torch.empty(rows, cols, dtype=self.dtype, device=self.device)
            self._workspace[key] = buf
        return buf

    def evaluate(
        self,
        slices: Tensor,
        blocks: Tensor,
        ctf: CtfParameters,
        *,
        gradient_scale: float | None = None,
        statistics: bool = False,
    ) -> LikelihoodResult:
        """Evaluate a batch of images against the slices of one volume.

        slices: (D, M) from `slices()` (only values are used).
        blocks: (B, 2h+1, h+1) from `image_blocks()`; ctf: their CTF parameters.
        gradient_scale: if given, also return dL/dS for L = gradient_scale * sum_i nll_i.
        statistics: also return the posterior-weighted sums EM needs.
        """
        s = slices.detach().to(self._complex)
        blocks = self.crop_blocks(blocks)
        n_images = blocks.shape[0]
        n_dir, p_count, t_count, m = self.n_directions, self.n_inplane, self.n_shifts, self.n_points
        inv_var = 1.0 / self.config.noise_sigma**2
        fold_quad = t_count == 1  # the quadratic term rides in the same GEMM as the data term
        # model operand: [Re S, Im S, log w_d, 1 (, |S|^2)]  (D, K)
        columns = [s.real, s.imag, self.log_weights_pd[0].unsqueeze(1), torch.ones_like(
            s.real[:, :1])]
        s_power = s.real**2 + s.imag**2
        if fold_quad:
            columns.append(s_power)
        s_aug = torch.cat(columns, dim=1).contiguous()
        want_grad = gradient_scale is not None
        accumulate = want_grad or statistics
        grad_data = torch.zeros(n_dir, 2 * m, dtype=self.dtype, device=self.device)
        grad_quad = torch.zeros(n_dir, m, dtype=self.dtype, device=self.device)

        nll = torch.empty(n_images, dtype=self.dtype, device=self.device)
        best_index = torch.empty(n_images, dtype=torch.long, device=self.device)
        best_prob = torch.empty(n_images, dtype=self.dtype, device=self.device)
        image_chunk, dir_chunk = self._chunk_sizes(n_images)
        ctf_values = self.ctf_grid(ctf, self.dtype)  # (B, P, M)
        log_w_t = self.log_weights_t.repeat(p_count)  # rows are ordered (p, t)

        for start in range(0, n_images, image_chunk):
            stop = min(n_images, start + image_chunk)
            b = stop - start
            rows = b * p_count * t_count
            full = hermitian_extend(blocks[start:stop].to(self._complex))
            x = sample_blocks(full, self.interpolation, (p_count, m))  # (b, P, M)
            c = ctf_values[start:stop]
            wc = c * self.weights_k
            quad_lhs = (wc * c).reshape(b * p_count, m) * (0.5 * inv_var)
            wc_scaled = (wc * inv_var).unsqueeze(2)
            if t_count == 1:  # no shift grid: the un-shift phases are all 1
                y = x.unsqueeze(2)
            else:
                y = x.unsqueeze(2) * self.unshift.unsqueeze(0)
            # data operand: [Re y, Im y, 1, log w_t (, -quad)]  (rows, K)
            y_aug = self._buffer("data", rows, s_aug.shape[1])
            y4 = y_aug.view(b, p_count, t_count, -1)
            torch.mul(y.real, wc_scaled, out=y4[..., :m])
            torch.mul(y.imag, wc_scaled, out=y4[..., m : 2 * m])
            y4[..., 2 * m] = 1.0
            y4[..., 2 * m + 1] = log_w_t.view(p_count, t_count)
            if fold_quad:
                y4[..., 2 * m + 2 :] = -quad_lhs.view(b, p_count, 1, m)
            coeffs = self.image_coefficients(blocks[start:stop])
            data_norm = (coeffs.real**2 + coeffs.imag**2) @ self.weights_k  # (b,)

            if dir_chunk >= n_dir:
                lse, arg, top = self._single_pass(
                    y_aug, quad_lhs, s_aug, s_power, b, accumulate, grad_data, grad_quad
                )
            else:
                lse, arg, top = self._chunked_passes(
                    y_aug, quad_lhs, s_aug, s_power, b, dir_chunk, accumulate, grad_data,
                    grad_quad,
                )
            nll[start:stop] = -lse + 0.5 * inv_var * data_norm + self.log_normaliser
            best_index[start:stop] = arg
            best_prob[start:stop] = torch.exp(top - lse)

        result = LikelihoodResult(nll, best_index, best_prob)
        if want_grad:
            data_c = torch.complex(grad_data[:, :m], grad_data[:, m:])
            # dE/dS (complex-gradient convention) = (w C^2 S - w C X) / s^2
            result.slice_gradient = (2 * grad_quad * s - data_c) * gradient_scale
        if statistics:
            result.statistics = (
                torch.complex(grad_data[:, :m], grad_data[:, m:]) / inv_var,
                2 * grad_quad / inv_var,
            )
        return result

    # ------------------------------------------------------------- hard assignments
    def _image_terms(self, blocks: Tensor, ctf_values: Tensor, start: int, stop: int):
        """(X rotated, w C, C^2 w) of images start:stop: (b, P, M) complex, (b, P, M) x2."""
        p_count, m = self.n_inplane, self.n_points
        full = hermitian_extend(blocks[start:stop].to(self._complex))
        x = sample_blocks(full, self.interpolation, (p_count, m))
        c = ctf_values[start:stop]
        wc = c * self.weights_k
        return x, wc, wc * c

    def best_poses(
        self, slices: Tensor, blocks: Tensor, ctf: CtfParameters, *, score: str = "correlation"
    ) -> tuple[Tensor, Tensor]:
        """The single best quadrature point of every image and its score.

        score="correlation": normalised cross-correlation Re<X, C S> / ||C S|| (the image norm
        is the same for every pose), as iterative projection matching uses; "likelihood":
        the maximum of log w - E (the MAP pose). Returns (flat pose index, score).
        """
        if score not in ("correlation", "likelihood"):
            raise ValueError("score must be 'correlation' or 'likelihood'")
        if score == "likelihood":
            result = self.evaluate(slices, blocks, ctf)
            return result.best_pose_index, torch.log(result.best_pose_probability)
        s = slices.detach().to(self._complex)
        blocks = self.crop_blocks(blocks)
        n_images = blocks.shape[0]
        p_count, t_count, m = self.n_inplane, self.n_shifts, self.n_points
        s_stacked = torch.cat([s.real, s.imag], dim=1)
        s_power = s.real**2 + s.imag**2
        ctf_values = self.ctf_grid(ctf, self.dtype)
        image_chunk, dir_chunk = self._chunk_sizes(n_images)
        best_index = torch.empty(n_images, dtype=torch.long, device=self.device)
        best_score = torch.empty(n_images, dtype=self.dtype, device=self.device)
        for start in range(0, n_images, image_chunk):
            stop = min(n_images, start + image_chunk)
            b = stop - start
            x, wc, wc2 = self._image_terms(blocks, ctf_values, start, stop)
            y = (x.unsqueeze(2) * self.unshift.unsqueeze(0)) * wc.unsqueeze(2)
            y_stacked = torch.cat([y.real, y.imag], dim=-1).reshape(b * p_count * t_count, 2 * m)
            top = torch.full((b,), -math.inf, dtype=self.dtype, device=self.device)
            arg = torch.zeros(b, dtype=torch.long, device=self.device)
            for d0 in range(0, self.n_directions, dir_chunk):
                d1 = min(self.n_directions, d0 + dir_chunk)
                cross = (y_stacked @ s_stacked[d0:d1].T).view(b, p_count, t_count, -1)
                norm = (wc2.reshape(b * p_count, m) @ s_power[d0:d1].T).clamp(min=1e-30).sqrt()
                cc = (cross / norm.view(b, p_count, 1, -1)).reshape(b, -1)
                chunk_top, chunk_arg = cc.max(dim=1)
                better = chunk_top > top
                arg = torch.where(better, self._flat_pose(chunk_arg, d0, d1 - d0), arg)
                top = torch.maximum(top, chunk_top)
            best_index[start:stop] = arg
            best_score[start:stop] = top
        return best_index, best_score

    def hard_statistics(
        self, blocks: Tensor, ctf: CtfParameters, pose_index: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Back-projection sums with every image at one pose: (sum w C X, sum w C^2), (D, M).

        The same quantities as `evaluate(..., statistics=True)` with one-hot responsibilities.
        """
        blocks = self.crop_blocks(blocks)
        n_images = blocks.shape[0]
        m = self.n_points
        ctf_values = self.ctf_grid(ctf, self.dtype)
        d, p, t = self.decode_pose(pose_index.to(self.device))
        numerator = torch.zeros(self.n_directions, m, dtype=self._complex, device=self.device)
        denominator = torch.zeros(self.n_directions, m, dtype=self.dtype, device=self.device)
        image_chunk = max(1, self._chunk_sizes(n_images)[0])
        for start in range(0, n_images, image_chunk):
            stop = min(n_images, start + image_chunk)
            x, wc, wc2 = self._image_terms(blocks, ctf_values, start, stop)
            rows = torch.arange(stop - start, device=self.device)
            p_i, t_i, d_i = p[start:stop], t[start:stop], d[start:stop]
            x_best = x[rows, p_i] * self.unshift[p_i, t_i]  # (b, M)
            numerator.index_add_(0, d_i, x_best * wc[rows, p_i])
            denominator.index_add_(0, d_i, wc2[rows, p_i])
        return numerator, denominator

    def _logits(self, y_aug, quad_lhs, s_aug, s_power, d0, d1, b, out=None) -> Tensor:
        """log w_dpt - E_idpt for directions d0:d1 as a (b * P * T, d1 - d0) matrix."""
        out = torch.mm(y_aug, s_aug[d0:d1].T, out=out)
        if self.n_shifts > 1:
            quad = quad_lhs @ s_power[d0:d1].T  # (b*P, Dc), shared by every shift
            out.view(b, self.n_inplane, self.n_shifts, -1).sub_(
                quad.view(b, self.n_inplane, 1, -1)
            )
        return out

    def _accumulate(self, resp, y_aug, quad_lhs, b, d0, d1, grad_data, grad_quad) -> None:
        """Add the posterior-weighted sums of one block of responsibilities (rows, Dc)."""
        m = self.n_points
        if self.n_shifts == 1:
            both = resp.T @ y_aug  # (Dc, K): the data sums and (negated) quadratic sums at once
            grad_data[d0:d1] += both[:, : 2 * m]
            grad_quad[d0:d1] -= both[:, 2 * m + 2 :]
        else:
            grad_data[d0:d1] += resp.T @ y_aug[:, : 2 * m]
            resp_pt = resp.view(b * self.n_inplane, self.n_shifts, -1).sum(1)
            grad_quad[d0:d1] += resp_pt.T @ quad_lhs

    def _shifted_exp_(self, per_image: Tensor, offset: Tensor) -> Tensor:
        """In place exp(x - offset), with arguments clamped 8 above log(smallest normal float).

        The clamp changes posterior masses below 1e-34 (float32) of the largest; without it,
        exp near and below the denormal range, and GEMMs fed with denormals, take CPU slow
        paths that are over 10x slower.
        """
        floor = math.log(torch.finfo(self.dtype).tiny) + 8.0
        return per_image.sub_(offset.unsqueeze(1)).clamp_(min=floor).exp_()

    def _single_pass(self, y_aug, quad_lhs, s_aug, s_power, b, accumulate, grad_data, grad_quad):
        rows = y_aug.shape[0]
        n_dir = self.n_directions
        logits = self._logits(
            y_aug, quad_lhs, s_aug, s_power, 0, n_dir, b, out=self._buffer("logits", rows, n_dir)
        )
        per_image = logits.view(b, -1)
        top, arg_local = per_image.max(dim=1)
        self._shifted_exp_(per_image, top)
        total = per_image.sum(1)
        lse = top + torch.log(total)
        arg = self._flat_pose(arg_local, 0, n_dir)
        if accumulate:
            per_image.div_(total.unsqueeze(1))
            self._accumulate(logits, y_aug, quad_lhs, b, 0, n_dir, grad_data, grad_quad)
        return lse, arg, top

    def _chunked_passes(
        self, y_aug, quad_lhs, s_aug, s_power, b, dir_chunk, accumulate, grad_data, grad_quad
    ):
        """Two passes over direction chunks: a stable running log-sum-exp, then the sums."""
        rows = y_aug.shape[0]
        running_max = torch.full((b,), -math.inf, dtype=self.dtype, device=self.device)
        running_sum = torch.zeros(b, dtype=self.dtype, device=self.device)
        arg = torch.zeros(b, dtype=torch.long, device=self.device)
        n_dir = self.n_directions
        for d0 in range(0, n_dir, dir_chunk):
            d1 = min(n_dir, d0 + dir_chunk)
            buf = self._buffer("logits", rows, d1 - d0)
            per_image = self._logits(y_aug, quad_lhs, s_aug, s_power, d0, d1, b, out=buf).view(
                b, -1
            )
            chunk_max, chunk_arg = per_image.max(dim=1)
            new_max = torch.maximum(running_max, chunk_max)
            running_sum = running_sum * torch.exp(running_max - new_max) + self._shifted_exp_(
                per_image, new_max
            ).sum(1)
            arg = torch.where(chunk_max > running_max, self._flat_pose(chunk_arg, d0, d1 - d0), arg)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        if accumulate:
            for d0 in range(0, n_dir, dir_chunk):
                d1 = min(n_dir, d0 + dir_chunk)
                buf = self._buffer("logits", rows, d1 - d0)
                logits = self._logits(y_aug, quad_lhs, s_aug, s_power, d0, d1, b, out=buf)
                self._shifted_exp_(logits.view(b, -1), lse)
                self._accumulate(logits, y_aug, quad_lhs, b, d0, d1, grad_data, grad_quad)
        return lse, arg, running_max

    def _flat_pose(self, chunk_arg: Tensor, d0: int, dir_chunk_len: int) -> Tensor:
        """Convert an argmax over a (P, T, Dc) chunk into the global (d * P + p) * T + t."""
        t_count = self.n_shifts
        d_local = chunk_arg % dir_chunk_len
        pt = chunk_arg // dir_chunk_len
        t = pt % t_count
        p = pt // t_count
        return ((d_local + d0) * self.n_inplane + p) * t_count + t

    def decode_pose(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat pose index -> (direction, in-plane, shift) indices."""
        t = index % self.n_shifts
        dp = index // self.n_shifts
        return dp // self.n_inplane, dp % self.n_inplane, t

    def pose_parameters(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Flat pose indices -> RELION Euler angles (n, 3) degrees and shifts (n, 2) pixels."""
        from cryostoch.geometry.rotations import direction_to_euler

        d, p, t = self.decode_pose(index.to(self.device))
        euler = direction_to_euler(self.orientations.directions.to(torch.float64)[d])
        euler = euler.clone()
        euler[:, 2] = torch.rad2deg(self.orientations.inplane_angles_rad.to(torch.float64)[p])
        return euler, self.shifts.shifts_px.to(torch.float64)[t]
