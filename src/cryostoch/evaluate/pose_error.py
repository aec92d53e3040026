"""How far estimated poses lie from the true ones, in whatever frame and hand the map came out.

A reconstruction from a random start is the truth seen in a frame of its own: rotated by a
global rotation `Q` and perhaps mirrored. With RELION's convention (an image is the projection
along z of `V(A^T x)`, `A` the pose matrix of (rot, tilt, psi)), a map `V_est(x) = V_true(Q x)`
is projected like the truth when `A_est = A_true Q`; a mirrored one, `V_est(x) = V_true(Q M x)`
with `M = diag(1, 1, -1)`, when `A_est = M A_true Q M` (the projection along z does not see the
mirror in z). With a point group `G` of the truth, `A_true g` serves for every `g` in `G`.

`fit_frame` finds `Q` and the hand from the poses alone: every particle proposes
`Q_j = A_true_j^T A'_j` (`A' = A_est`, or `M A_est M` when mirrored); the proposal that most
other particles agree with (within `inlier_deg`) wins and is refined as the chordal mean of its
inliers' proposals. The per-particle error is then the angle between `A'_j` and the nearest
`A_true_j g Q`. `frame_modes` repeats the search on the particles that disagree, to show
whether they share another frame: a particle set split between modes related by, say, 120 deg
about one axis has confused the mates of a pseudo-symmetry.

Shifts: the estimated minus the true image shift of particle `j` is modelled as the projection
`(A_est_j u)_xy` of one 3-D translation `u` of the map (fitted by least squares over the
inliers); the shift error is what remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryostoch.geometry.rotations import geodesic_angle_rad, matrix_to_euler

__all__ = ["FrameFit", "PoseErrors", "fit_frame", "frame_modes", "nearest_frame_angles_deg",
           "pose_errors", "MIRROR_Z"]

MIRROR_Z = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
CANDIDATES = 256  # proposals tried per hand (the best of a few hundred is the mode)
CHUNK = 16  # proposals scored at once (memory: CHUNK x N x 3 x 3)


@dataclass(frozen=True)
class FrameFit:
    """The global frame of the estimate: `rotation` Q `(3, 3)`, `mirrored`, and which
    particles agree with it within `inlier_deg` (`inliers` `(N,)` bool)."""

    rotation: Tensor
    mirrored: bool
    inliers: Tensor
    inlier_deg: float

    @property
    def inlier_share(self) -> float:
        return float(self.inliers.double().mean()) if self.inliers.numel() else 0.0


def _oriented(est: Tensor, mirrored: bool) -> Tensor:
    """`(N, 3, 3)` A' = A_est, or M A_est M for a mirrored map."""
    if not mirrored:
        return est
    m = MIRROR_Z.to(est)
    return m @ est @ m


def _nearest_mate_angles(oriented: Tensor, true: Tensor, q: Tensor, group: Tensor) -> Tensor:
    """min over g of the angle between `oriented` `(N, 3, 3)` and `true g q`, `group`
    `(G, 3, 3)`: `(N,)` for one `q` `(3, 3)` or one per particle `(N, 3, 3)`, `(K, N)` for `K`
    candidates `(K, 1, 3, 3)` (broadcast)."""
    best = torch.full(oriented.shape[:1], math.inf, dtype=oriented.dtype, device=oriented.device)
    for g in group:
        best = torch.minimum(best, geodesic_angle_rad(oriented, true @ g @ q))
    return best


def _inlier_counts(oriented: Tensor, true: Tensor, proposals: Tensor, group: Tensor,
                   inlier_rad: float) -> Tensor:
    """`(K,)` particles within `inlier_rad` of each proposal `(K, 3, 3)` (nearest mate)."""
    return torch.cat([
        (_nearest_mate_angles(oriented, true, chunk.unsqueeze(1), group) < inlier_rad).sum(dim=1)
        for chunk in proposals.split(CHUNK)])


def _chordal_mean(rotations: Tensor) -> Tensor:
    """The rotation nearest (Frobenius) to the mean of `rotations` `(N, 3, 3)`."""
    u, _, vh = torch.linalg.svd(rotations.mean(dim=0))
    d = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d])) @ vh


def _aligned_proposals(oriented: Tensor, true: Tensor, q: Tensor, group: Tensor) -> Tensor:
    """`(N, 3, 3)` each particle's proposal g^T A_true^T A', with the mate g nearest to `q`."""
    stack = torch.stack([g.T @ true.transpose(-1, -2) @ oriented for g in group])  # (G, N, 3, 3)
    angles = geodesic_angle_rad(stack, q.expand_as(stack))  # (G, N)
    pick = angles.argmin(dim=0)
    return stack[pick, torch.arange(oriented.shape[0])]


def _fit_hand(est: Tensor, true: Tensor, group: Tensor, mirrored: bool, inlier_rad: float,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(Q, inliers) for one hand: the most agreed-with proposal, refined twice."""
    oriented = _oriented(est, mirrored)
    proposals = true.transpose(-1, -2) @ oriented  # (N, 3, 3), identity mate
    n = proposals.shape[0]
    pick = torch.randperm(n, generator=generator)[:CANDIDATES]
    counts = _inlier_counts(oriented, true, proposals[pick], group, inlier_rad)
    q = proposals[pick[int(counts.argmax())]]
    for _ in range(2):  # refine on the inliers (the mode's centre, not one noisy proposal)
        inliers = _nearest_mate_angles(oriented, true, q, group) < inlier_rad
        if int(inliers.sum()) == 0:
            break
        q = _chordal_mean(_aligned_proposals(oriented[inliers], true[inliers], q, group))
    return q, _nearest_mate_angles(oriented, true, q, group) < inlier_rad


def _checked(est: Tensor, true: Tensor, group: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """`est`, `true` `(N, 3, 3)` and `group` `(G, 3, 3)` (None: C1) in float64, checked."""
    est, true = est.to(torch.float64), true.to(torch.float64)
    group = torch.eye(3, dtype=torch.float64)[None] if group is None else group.to(true)
    _check_rotations(est, true, group)
    return est, true, group


def _check_rotations(est: Tensor, true: Tensor, group: Tensor) -> None:
    if est.dim() != 3 or tuple(est.shape[1:]) != (3, 3) or est.shape != true.shape:
        raise ValueError(f"poses must be two (N, 3, 3) stacks of one N, got "
                         f"{tuple(est.shape)} and {tuple(true.shape)}")
    if est.shape[0] == 0:
        raise ValueError("no particles to compare")
    if group.dim() != 3 or tuple(group.shape[1:]) != (3, 3):
        raise ValueError(f"group must be (G, 3, 3), got {tuple(group.shape)}")


def fit_frame(est: Tensor, true: Tensor, group: Tensor | None = None, *,
              inlier_deg: float = 10.0, hand: str = "either",
              generator: torch.Generator | None = None) -> FrameFit:
    """The global rotation and hand relating estimated poses `est` `(N, 3, 3)` to true poses
    `true` `(N, 3, 3)` (module docstring). `group` `(G, 3, 3)`: the truth's point group (None:
    C1). `hand`: 'either' (the one more particles agree with), 'same' or 'mirrored'."""
    est, true, group = _checked(est, true, group)
    if hand not in ("either", "same", "mirrored"):
        raise ValueError(f"hand must be 'either', 'same' or 'mirrored', got {hand!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    inlier_rad = math.radians(inlier_deg)
    hands = {"either": (False, True), "same": (False,), "mirrored": (True,)}[hand]
    fits = [(*_fit_hand(est, true, group, m, inlier_rad, generator), m) for m in hands]
    q, inliers, mirrored = max(fits, key=lambda f: int(f[1].sum()))
    return FrameFit(q, mirrored, inliers, inlier_deg)


def frame_modes(est: Tensor, true: Tensor, group: Tensor | None = None, *,
                inlier_deg: float = 10.0, max_modes: int = 4, min_share: float = 0.05,
                generator: torch.Generator | None = None) -> list[FrameFit]:
    """Up to `max_modes` frames, each fitted (same hand as the first) on the particles that no
    earlier one holds; a mode is kept while it holds at least `min_share` of the particles.
    Each `FrameFit.inliers` is `(N,)` over all particles (disjoint between modes)."""
    first = fit_frame(est, true, group, inlier_deg=inlier_deg, generator=generator)
    modes, taken = [first], first.inliers.clone()
    n = est.shape[0]
    hand = "mirrored" if first.mirrored else "same"
    while len(modes) < max_modes and int((~taken).sum()) >= max(min_share * n, 1):
        rest = (~taken).nonzero().squeeze(1)
        fit = fit_frame(est[rest], true[rest], group, inlier_deg=inlier_deg, hand=hand,
                        generator=generator)
        if int(fit.inliers.sum()) < min_share * n:
            break
        inliers = torch.zeros(n, dtype=torch.bool)
        inliers[rest[fit.inliers]] = True
        modes.append(FrameFit(fit.rotation, fit.mirrored, inliers, inlier_deg))
        taken |= inliers
    return modes


@dataclass(frozen=True)
class PoseErrors:
    """Per-particle errors against one frame: `angle_deg` `(N,)` to the nearest symmetry mate,
    `shift_px` `(N,)` after the fitted map translation `translation_px` `(3,)`."""

    frame: FrameFit
    angle_deg: Tensor
    shift_px: Tensor
    translation_px: Tensor

    def share_within(self, degrees: float) -> float:
        return float((self.angle_deg <= degrees).double().mean())

    @property
    def frame_euler_deg(self) -> Tensor:
        """Q as RELION Euler angles (rot, tilt, psi) in degrees."""
        return matrix_to_euler(self.frame.rotation[None])[0]


def pose_errors(est: Tensor, true: Tensor, est_shifts_px: Tensor, true_shifts_px: Tensor,
                frame: FrameFit, group: Tensor | None = None) -> PoseErrors:
    """Errors of `est` `(N, 3, 3)` / `est_shifts_px` `(N, 2)` against `true` `(N, 3, 3)` /
    `true_shifts_px` `(N, 2)` in `frame` (from `fit_frame`)."""
    est, true, group = _checked(est, true, group)
    angles = nearest_frame_angles_deg(est, true, [frame], group)
    delta = (est_shifts_px - true_shifts_px).to(torch.float64)  # (N, 2)
    use = frame.inliers if int(frame.inliers.sum()) >= 3 else torch.ones_like(frame.inliers)
    design = est[:, :2, :]  # (N, 2, 3): (A_est u)_xy
    u = torch.linalg.lstsq(design[use].reshape(-1, 3), delta[use].reshape(-1, 1)).solution
    residual = delta - (design @ u).squeeze(-1)
    return PoseErrors(frame, angles, residual.norm(dim=1), u.squeeze(1))


def nearest_frame_angles_deg(est: Tensor, true: Tensor, frames: list[FrameFit],
                             group: Tensor | None = None) -> Tensor:
    """`(N,)` each particle's angular error in degrees to the nearest of `frames` (one hand,
    from `frame_modes`): the error modulo a pseudo-symmetry whose mates the frames are."""
    est, true, group = _checked(est, true, group)
    oriented = _oriented(est, frames[0].mirrored)
    angles = torch.stack([_nearest_mate_angles(oriented, true, f.rotation, group)
                          for f in frames])
    return torch.rad2deg(angles.min(dim=0).values)
