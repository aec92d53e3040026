"""The posterior over quadrature points as GEMMs: log-sum-exp and posterior-weighted sums.

With y_ipt = X_ipt (rotated, un-shifted image samples) and the psi = 0 slices S_d, the log of
the unnormalised posterior of image i at point (d, p, t) is

    logit_idpt = log w_d + log w_t + Re sum_k (w_k C_ip(k) / s^2) conj(y_ipt(k)) S_d(k)
                 - sum_k (w_k C_ip(k)^2 / (2 s^2)) |S_d(k)|^2

(log w_d already holds the uniform in-plane weight 1 / P). Every term is one real matrix product
of a *data operand* (one row per image x angle x shift) by a *model operand* (one row per
direction); `OperandLayout` names their column blocks. Without a shift grid the quadratic term
is folded into the same product; with one, it is shared by every shift and done separately.
Directions are processed in chunks so that the (rows x directions) logits fit the memory budget,
with a running log-sum-exp across chunks; image chunks are the caller's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.geometry.poses import PoseGrid


@dataclass(frozen=True)
class OperandLayout:
    """Column blocks of the two operands (K = width columns each).

    model operand (D, K): [Re S | Im S | log w_d | 1       | |S|^2 (folded only)]
    data operand (rows, K): [Re y' | Im y' | 1      | log w_t | -q (folded only)]
    with y' = w C y / s^2 and q = w C^2 / (2 s^2), so one product gives the whole logit.
    """

    n_points: int
    fold_quadratic: bool

    @property
    def real(self) -> slice:
        return slice(0, self.n_points)

    @property
    def imag(self) -> slice:
        return slice(self.n_points, 2 * self.n_points)

    @property
    def data(self) -> slice:
        """Both the real and the imaginary block."""
        return slice(0, 2 * self.n_points)

    @property
    def direction_weight(self) -> int:
        """Model: log w_d; data: 1."""
        return 2 * self.n_points

    @property
    def shift_weight(self) -> int:
        """Model: 1; data: log w_t."""
        return 2 * self.n_points + 1

    @property
    def quadratic(self) -> slice:
        """Model: |S|^2; data: -q (present only when folded)."""
        return slice(2 * self.n_points + 2, 3 * self.n_points + 2)

    @property
    def width(self) -> int:
        return 2 * self.n_points + 2 + (self.n_points if self.fold_quadratic else 0)


def model_operand(slices: Tensor, log_direction_weights: Tensor, layout: OperandLayout
                  ) -> tuple[Tensor, Tensor]:
    """(D, M) complex slices, (D,) log w_d -> ((D, K) model operand, (D, M) |S|^2)."""
    power = slices.real**2 + slices.imag**2
    columns = [slices.real, slices.imag, log_direction_weights.unsqueeze(1),
               torch.ones_like(slices.real[:, :1])]
    if layout.fold_quadratic:
        columns.append(power)
    return torch.cat(columns, dim=1).contiguous(), power


@dataclass
class PosteriorSums:
    """Posterior-weighted sums over the images of a batch, per direction.

    data: (D, 2M) real, [Re | Im] of sum_ipt r_idpt w C_ip y_ipt / s^2.
    quadratic: (D, M) real, sum_ip r_idp w C_ip^2 / (2 s^2).
    """

    data: Tensor
    quadratic: Tensor

    @staticmethod
    def zeros(n_directions: int, n_points: int, *, dtype, device) -> PosteriorSums:
        return PosteriorSums(
            torch.zeros(n_directions, 2 * n_points, dtype=dtype, device=device),
            torch.zeros(n_directions, n_points, dtype=dtype, device=device),
        )

    def _data_complex(self) -> Tensor:
        m = self.quadratic.shape[1]
        return torch.complex(self.data[:, :m], self.data[:, m:])

    def slice_gradient(self, slices: Tensor, scale: float) -> Tensor:
        """dL/dS (D, M) complex for L = scale * sum_i nll_i (torch's complex convention):
        dE/dS = (w C^2 S - w C X) / s^2."""
        return (2 * self.quadratic * slices - self._data_complex()) * scale

    def em_statistics(self, inverse_variance: float) -> tuple[Tensor, Tensor]:
        """(sum r w C X (D, M) complex, sum r w C^2 (D, M) real), the EM back-projection sums."""
        return self._data_complex() / inverse_variance, 2 * self.quadratic / inverse_variance


class PosteriorKernel:
    """Log-sum-exp and posterior sums over (directions x angles x shifts) for image chunks."""

    def __init__(self, grid: PoseGrid, n_points: int, memory_budget_mb: float, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.grid = grid
        self.n_points = n_points
        self.memory_budget_mb = memory_budget_mb
        self.dtype = dtype
        self.device = device
        self._workspace: dict[tuple, Tensor] = {}

    def chunk_sizes(self, n_images: int) -> tuple[int, int]:
        """(images per chunk, directions per chunk) so the logits block fits the budget."""
        g = self.grid
        budget = self.memory_budget_mb * 2**20 / (torch.finfo(self.dtype).bits // 8)
        rows_per_image = g.n_inplane * g.n_shifts
        per_image = rows_per_image * max(g.n_directions, 2 * self.n_points + 3)
        image_chunk = max(1, min(n_images, int(budget // per_image)))
        dir_chunk = max(1, min(g.n_directions, int(budget // (image_chunk * rows_per_image))))
        return image_chunk, dir_chunk

    def buffer(self, name: str, rows: int, cols: int) -> Tensor:
        """A reused scratch matrix: fresh multi-megabyte tensors cost page faults every call."""
        key = (name, rows, cols)
        buf = self._workspace.get(key)
        if buf is None:
            if len(self._workspace) > 8:
                self._workspace.clear()
            buf = torch.empty(rows, cols, dtype=self.dtype, device=self.device)
            self._workspace[key] = buf
        return buf

    def logits(self, data_op, quad_lhs, model_op, power, d0, d1, b, out=None) -> Tensor:
        """log w_dpt - E_idpt for directions d0:d1 as a (b * P * T, d1 - d0) matrix.

        data_op: (b*P*T, K); quad_lhs: (b*P, M) q per image and angle; model_op: (D, K);
        power: (D, M) |S|^2.
        """
        g = self.grid
        out = torch.mm(data_op, model_op[d0:d1].T, out=out)
        if g.n_shifts > 1:
            quad = quad_lhs @ power[d0:d1].T  # (b*P, Dc), shared by every shift
            out.view(b, g.n_inplane, g.n_shifts, -1).sub_(quad.view(b, g.n_inplane, 1, -1))
        return out

    def accumulate(self, resp, data_op, quad_lhs, layout: OperandLayout, b, d0, d1,
                   sums: PosteriorSums) -> None:
        """Add the sums of one block of responsibilities resp (b*P*T, d1 - d0)."""
        g = self.grid
        if layout.fold_quadratic:
            both = resp.T @ data_op  # (Dc, K): data sums and negated quadratic sums at once
            sums.data[d0:d1] += both[:, layout.data]
            sums.quadratic[d0:d1] -= both[:, layout.quadratic]
        else:
            sums.data[d0:d1] += resp.T @ data_op[:, layout.data]
            resp_pt = resp.view(b * g.n_inplane, g.n_shifts, -1).sum(1)
            sums.quadratic[d0:d1] += resp_pt.T @ quad_lhs

    def shifted_exp_(self, per_image: Tensor, offset: Tensor) -> Tensor:
        """In place exp(x - offset), with arguments clamped 8 above log(smallest normal float).

        The clamp changes posterior masses below 1e-34 (float32) of the largest; without it,
        exp near and below the denormal range, and GEMMs fed with denormals, take CPU slow
        paths that are over 10x slower.
        """
        floor = math.log(torch.finfo(self.dtype).tiny) + 8.0
        return per_image.sub_(offset.unsqueeze(1)).clamp_(min=floor).exp_()

    def run(self, data_op, quad_lhs, model_op, power, layout, b, dir_chunk,
            sums: PosteriorSums | None, top_k: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """(log-sum-exp (b,), flat indices of the `top_k` most probable points (b, top_k),
        their logits (b, top_k), best first); adds the posterior sums into `sums` when
        given."""
        if dir_chunk >= self.grid.n_directions:
            return self._single_pass(data_op, quad_lhs, model_op, power, layout, b, sums,
                                     top_k)
        return self._chunked_passes(data_op, quad_lhs, model_op, power, layout, b, dir_chunk,
                                    sums, top_k)

    def _single_pass(self, data_op, quad_lhs, model_op, power, layout, b, sums, top_k):
        rows, n_dir = data_op.shape[0], self.grid.n_directions
        logits = self.logits(data_op, quad_lhs, model_op, power, 0, n_dir, b,
                             out=self.buffer("logits", rows, n_dir))
        per_image = logits.view(b, -1)
        values, arg_local = per_image.topk(min(top_k, per_image.shape[1]), dim=1)
        top = values[:, 0]
        self.shifted_exp_(per_image, top)
        total = per_image.sum(1)
        lse = top + torch.log(total)
        arg = self.grid.from_chunk_argmax(arg_local, 0, n_dir)
        if sums is not None:
            per_image.div_(total.unsqueeze(1))
            self.accumulate(logits, data_op, quad_lhs, layout, b, 0, n_dir, sums)
        return lse, arg, values

    def _chunked_passes(self, data_op, quad_lhs, model_op, power, layout, b, dir_chunk, sums,
                        top_k):
        """Two passes over direction chunks: a stable running log-sum-exp (and running top
        k), then the sums."""
        rows, n_dir = data_op.shape[0], self.grid.n_directions
        running_max = torch.full((b,), -math.inf, dtype=self.dtype, device=self.device)
        running_sum = torch.zeros(b, dtype=self.dtype, device=self.device)
        best = torch.full((b, 0), -math.inf, dtype=self.dtype, device=self.device)
        arg = torch.zeros(b, 0, dtype=torch.long, device=self.device)
        for d0 in range(0, n_dir, dir_chunk):
            d1 = min(n_dir, d0 + dir_chunk)
            buf = self.buffer("logits", rows, d1 - d0)
            per_image = self.logits(data_op, quad_lhs, model_op, power, d0, d1, b,
                                    out=buf).view(b, -1)
            chunk_values, chunk_arg = per_image.topk(min(top_k, per_image.shape[1]), dim=1)
            # merge with the running list; ties keep the earlier chunk's (as max did)
            merged = torch.cat([best, chunk_values], 1)
            merged_arg = torch.cat([arg, self.grid.from_chunk_argmax(chunk_arg, d0, d1 - d0)], 1)
            best, order = merged.topk(min(top_k, merged.shape[1]), dim=1, sorted=True)
            arg = merged_arg.gather(1, order)
            new_max = torch.maximum(running_max, chunk_values[:, 0])
            running_sum = running_sum * torch.exp(running_max - new_max) + self.shifted_exp_(
                per_image, new_max).sum(1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        if sums is not None:
            for d0 in range(0, n_dir, dir_chunk):
                d1 = min(n_dir, d0 + dir_chunk)
                buf = self.buffer("logits", rows, d1 - d0)
                logits = self.logits(data_op, quad_lhs, model_op, power, d0, d1, b, out=buf)
                self.shifted_exp_(logits.view(b, -1), lse)
                self.accumulate(logits, data_op, quad_lhs, layout, b, d0, d1, sums)
        return lse, arg, best
