"""2-D class averages from a RELION 2-D classification, and the map projections that match them.

A careful user checks an ab initio map against the 2-D classes of the same particles: every
clean class average should look like some projection of the map. Averages are made the way
RELION aligned the particles (image shifted by its origin, then rotated by minus psi), each
image multiplied by its CTF (phase flipping with amplitude weighting), so an average holds the
projection filtered by the class's mean CTF^2; projections of the map get the same filter
before they are compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cryostoch.evaluate.align import so3_grid
from cryostoch.evaluate.transform import mirror_volume, rotate_volume
from cryostoch.fourier.grids import real_space_disc, rfft2_grid
from cryostoch.fourier.transforms import irfft2c, rfft2c
from cryostoch.operators.ctf import CtfParameters, evaluate_ctf


def rotate_images(images: Tensor, angle_rad: Tensor) -> Tensor:
    """(B, N, N) images rotated about the centre N//2 by `angle_rad` (B,) (counter-clockwise
    for x right, y up), bilinear, zero outside."""
    n = images.shape[-1]
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    theta = torch.zeros(len(angle_rad), 2, 3, dtype=images.dtype, device=images.device)
    # grid_sample reads the output pixel at R^-1 x: the inverse rotation
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, s, -s, c
    # the box centre N//2 is not the grid's centre (N-1)/2 for even N: shift by half a pixel
    offset = (n // 2 - (n - 1) / 2) * 2 / n
    theta[:, 0, 2] = offset - (theta[:, 0, 0] + theta[:, 0, 1]) * offset
    theta[:, 1, 2] = offset - (theta[:, 1, 0] + theta[:, 1, 1]) * offset
    grid = F.affine_grid(theta, (len(angle_rad), 1, n, n), align_corners=False)
    return F.grid_sample(images.unsqueeze(1), grid, align_corners=False).squeeze(1)


@dataclass(frozen=True)
class ClassAverages:
    averages: Tensor  # (K, N, N) CTF-weighted averages
    ctf2: Tensor  # (K, N, N//2+1) mean C^2 of each class on the rfft grid
    counts: Tensor  # (K,) particles per class
    class_numbers: list[int]


def class_averages(images: Tensor, ctf: CtfParameters, pixel_size_a: float, psi_deg: Tensor,
                   origin_px: Tensor, classes: Tensor, class_numbers: list[int]
                   ) -> ClassAverages:
    """Averages of the classes `class_numbers` from aligned particles.

    images: (B, N, N); psi_deg: (B,) RELION rlnAnglePsi; origin_px: (B, 2) rlnOriginX/Y in
    pixels (the shift that centres the particle); classes: (B,) rlnClassNumber.
    """
    n = images.shape[-1]
    ky, kx = rfft2_grid(n, device=images.device)
    scale = 1.0 / (n * pixel_size_a)
    c = evaluate_ctf(ctf.to(device=images.device), (kx * scale).unsqueeze(0),
                     (ky * scale).unsqueeze(0))  # (B, N, N//2+1)
    phase = torch.exp(-2j * math.pi * (kx * origin_px[:, 0, None, None]
                                       + ky * origin_px[:, 1, None, None]) / n)
    weighted = irfft2c(rfft2c(images.to(torch.float64)) * phase * c, n)
    # RELION's 2-D alignment: a feature at p of the shifted image lies at Rz(psi) p of the
    # class average (checked on the shared beta-galactosidase classes: -psi blurs them)
    aligned = rotate_images(weighted, torch.deg2rad(psi_deg.to(torch.float64)))
    averages, ctf2, counts = [], [], []
    for number in class_numbers:
        members = classes == number
        averages.append(aligned[members].mean(0))
        ctf2.append((c[members] ** 2).mean(0))
        counts.append(int(members.sum()))
    return ClassAverages(torch.stack(averages), torch.stack(ctf2), torch.tensor(counts),
                         list(class_numbers))


def _normalised(images: Tensor, mask: Tensor) -> Tensor:
    """(B, N, N) -> zero mean, unit norm inside `mask` (N, N), zero outside."""
    values = images * mask
    values = values - (values.sum((-2, -1), keepdim=True) / mask.sum()) * mask
    return values / values.flatten(1).norm(dim=1).clamp(min=1e-30)[:, None, None]


@dataclass(frozen=True)
class ProjectionMatch:
    correlation: Tensor  # (K,) best normalised cross-correlation of each average
    projections: Tensor  # (K, N, N) the matching projections, filtered, rotated and shifted
    hand: Tensor  # (K,) 0: the map as given, 1: its mirror image


def match_projections(volume: Tensor, averages: ClassAverages, *, step_deg: float = 10.0,
                      n_inplane: int = 72, max_shift_px: int = 6,
                      mask_radius_px: float | None = None) -> ProjectionMatch:
    """The projection of `volume` (N, N, N) (either hand) that best matches each average.

    Searches projection directions on a grid of `step_deg`, `n_inplane` in-plane angles and
    integer shifts up to `max_shift_px` (by FFT cross-correlation) inside a circular mask.
    """
    n = volume.shape[-1]
    mask = real_space_disc(n, mask_radius_px or 0.45 * n).to(torch.float64)
    rotations = so3_grid(math.radians(step_deg))
    directions = rotations.reshape(-1, math.ceil(2 * math.pi / math.radians(step_deg)),
                                   3, 3)[:, 0]  # psi = 0 of every direction
    angles = torch.arange(n_inplane, dtype=torch.float64) * (2 * math.pi / n_inplane)
    k = averages.averages.shape[0]
    rotated_avg = rotate_images(averages.averages.repeat_interleave(n_inplane, 0),
                                angles.repeat(k))  # (K*P, N, N)
    targets = _normalised(rotated_avg, mask)
    target_ft = torch.fft.rfft2(targets)
    shift_ok = real_space_disc(n, max_shift_px).roll((-(n // 2), -(n // 2)), (0, 1))
    best = torch.full((k,), -math.inf, dtype=torch.float64)
    best_proj = torch.zeros(k, n, n, dtype=torch.float64)
    hand = torch.zeros(k, dtype=torch.long)
    for h, vol in enumerate((volume.double(), mirror_volume(volume.double()))):
        for chunk in torch.split(directions, 8):  # bounds the (C, K, P, N, N) scores
            proj = rotate_volume(vol, chunk).sum(1)  # (C, N, N) projections along z
            filtered = irfft2c(rfft2c(proj)[:, None] * averages.ctf2[None], n)  # (C, K, N, N)
            ref = _normalised(filtered.reshape(-1, n, n), mask).reshape(len(chunk), k, n, n)
            cc = torch.fft.irfft2(torch.fft.rfft2(ref)[:, :, None].conj()
                                  * target_ft.reshape(k, n_inplane, n, -1)[None], s=(n, n))
            cc = cc.masked_fill(~shift_ok, -math.inf)  # (C, K, P, N, N)
            score, _ = cc.flatten(2).max(2)
            top, where = score.max(0)
            for c in torch.nonzero(top > best).flatten().tolist():
                best[c], hand[c] = top[c], h
                best_proj[c] = filtered[where[c], c]
    return ProjectionMatch(best, best_proj, hand)
