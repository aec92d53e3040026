"""`expected_curvature` and `fourier_preconditioner` against an independent
autograd Hessian of the pose-averaged data term (float64, tiny problem).

Reference (written here, not taken from the likelihood): with the posterior spread evenly over
the quadrature (weights w_d / P for direction d and in-plane angle p, w_t for shifts, sum 1),
the mean data term of images i = 1..B is

    f(B) = mean_i sum_{d,p,t} (w_d / P) w_t E_idpt,
    E_idpt = (1 / s^2) [ 1/2 sum_k w_k C_ip(k)^2 |S_d(k)|^2 - Re sum_k w_k conj(X_ipt(k)) C_ip S_d ]

where S_d(k) = sqrt(N) * (trilinear read of the spectrum block B at A_d^T (kx, ky, 0)), read at
the Hermitian twin (conjugated) where the x frequency is negative. The X term is linear in B
and has no curvature, so only the quadratic term is built. Because sum_t w_t = 1 it reduces to

    f(B) = (1 / (2 s^2)) sum_d w_d sum_k w_k mean_{i,p}(C_ip(k)^2) |S_d(k)|^2 .

Its Hessian with respect to the real parts Re B_e (and, identically, the imaginary parts) of
the block entries is

    H[e, e'] = (N / s^2) sum_{d,k} w_d w_k mean(C^2) a_e(d,k) a_e'(d,k),

with a_e(d, k) the trilinear weight of entry e in the read of S_d(k). The real/imaginary
coordinates are the ones that matter: `minibatch_objective` multiplies torch's complex
gradient dL/dRe B + i dL/dIm B by the preconditioner, a Newton step per real coordinate.

What `expected_curvature` returns (its docstring: "computed by back-projecting
N * w_d * w_k * mean C^2 with the same trilinear kernel") is sum_{d,k} (N / s^2) w_d w_k
mean(C^2) a_e(d,k), i.e. the ROW SUM of H (sum_e' a_e' = 1 for a read inside the block): the
lumped ("mass-lumped", EM-denominator) diagonal, with factor exactly 1 in real coordinates. It
equals the true diagonal H[e, e] only where every read hits e with weight 0 or 1, and is larger
elsewhere (a_e >= a_e^2). The tests pin exactly that, so a change of factor (sigma^2, sqrt(N),
the twin weights, the CTF average), a transposed slice geometry or a switch to/from the exact
diagonal is caught.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_ctf
from cryostoch.geometry.quadrature import OrientationQuadrature
from cryostoch.geometry.rotations import euler_to_matrix
from cryostoch.model.curvature import expected_curvature, fourier_preconditioner
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.operators import CtfParameters, evaluate_ctf

F64 = torch.float64


def ctf_set(n: int, seed: int):
    return random_ctf(n, seed, defocus_a=(6000.0, 12000.0), astigmatism_a=800.0,
                      amplitude_contrast=0.07)


N, RADIUS, PIXEL_A, SIGMA = 16, 3.0, 4.0, 1.3


# ---- the one place that builds a likelihood model and asks it for the curvature -------------
def model_curvature(orientations: OrientationQuadrature, ctf: CtfParameters):
    """(curvature block, volume oversampling, block shape) from the library under test."""
    cfg = LikelihoodConfig(box_size=N, pixel_size_a=PIXEL_A, max_radius_px=RADIUS,
                           noise_sigma=SIGMA, shift_radius_px=1.0, shift_step_px=1.0,
                           shift_sigma_px=1.0)
    model = MarginalLikelihood(cfg, dtype=F64, orientations=orientations)
    curvature = expected_curvature(model, ctf)
    return curvature, cfg.volume_oversampling


# ---- independent reference -------------------------------------------------------------------
def disc_points(n: int, radius: float):
    """Half-plane (kx > 0, or kx = 0 and ky >= 0) integer frequencies in the disc, twin
    weights 2 (1 for k = 0)."""
    r = int(radius)
    pts = [(kx, ky) for ky in range(-r, r + 1) for kx in range(0, r + 1)
           if kx * kx + ky * ky <= radius * radius and (kx > 0 or ky >= 0)]
    kx = torch.tensor([p[0] for p in pts], dtype=F64)
    ky = torch.tensor([p[1] for p in pts], dtype=F64)
    w = torch.where((kx == 0) & (ky == 0), 1.0, 2.0).to(F64)
    return kx, ky, w


def trilinear_read(block: torch.Tensor, points: torch.Tensor, oversampling: int) -> torch.Tensor:
    """Trilinear read of a half block [kz, ky, kx>=0] (centred axes of length 2h+1) at
    frequencies points (..., 3) ordered (x, y, z); conjugate twin where x < 0."""
    h = block.shape[-1] - 1
    flip = points[..., 0] < 0
    p = torch.where(flip[..., None], -points, points) * oversampling
    g = torch.stack([p[..., 2] + h, p[..., 1] + h, p[..., 0]], -1)  # (z, y, x) array coords
    g0 = g.floor()
    frac = g - g0
    out = torch.zeros(points.shape[:-1], dtype=block.dtype)
    for corner in range(8):
        offs = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], dtype=F64)
        idx = (g0 + offs).long()
        assert (idx >= 0).all() and (idx[..., 0] <= 2 * h).all() and (idx[..., 2] <= h).all()
        weight = torch.where(offs.bool(), frac, 1 - frac).prod(-1)
        out = out + weight * block[idx[..., 0], idx[..., 1], idx[..., 2]]
    return torch.where(flip, out.conj(), out)


def slices_and_coefficients(block, orientations, ctf, oversampling):
    """S_d(k) (D, M) and the quadratic form's coefficients c_dk (D, M), from the definitions:
    f(B) = sum_dk c_dk |S_d(k)|^2 with c_dk = w_d w_k mean_{i,p}(C_ip(k)^2) / (2 s^2)."""
    kx, ky, wk = disc_points(N, RADIUS)
    mats = orientations.direction_matrices
    points = kx[None, :, None] * mats[:, None, 0, :] + ky[None, :, None] * mats[:, None, 1, :]
    slices = math.sqrt(N) * trilinear_read(block, points, oversampling)  # (D, M)
    # CTF at the image frequencies rotated in-plane; the angle set 2 pi p / P is symmetric
    # under psi -> -psi, so the direction of the in-plane rotation does not matter for the mean
    psi = orientations.inplane_angles_rad[:, None]
    qx = torch.cos(psi) * kx - torch.sin(psi) * ky
    qy = torch.sin(psi) * kx + torch.cos(psi) * ky
    scale = 1.0 / (N * PIXEL_A)
    c2 = evaluate_ctf(ctf, (qx * scale)[None], (qy * scale)[None]).pow(2).mean((0, 1))  # (M,)
    wd = orientations.direction_weights
    return slices, 0.5 / SIGMA**2 * wd[:, None] * (wk * c2)[None, :]


def pose_averaged_quadratic(block, orientations, ctf, oversampling):
    """f(B) of the module docstring (quadratic part only)."""
    slices, coef = slices_and_coefficients(block, orientations, ctf, oversampling)
    return (coef * (slices.real**2 + slices.imag**2)).sum()


def orientation_set(n_dir: int, n_inplane: int, seed: int, grid_aligned: bool = False):
    g = torch.Generator().manual_seed(seed)
    if grid_aligned:
        # rot in {0, 90, 180, 270} and tilt in {0, 90}: every slice point of an integer
        # frequency lands on a node of the block, so every trilinear weight is 0 or 1
        euler = torch.tensor([[0.0, 0.0, 0.0], [90.0, 90.0, 0.0], [0.0, 90.0, 0.0],
                              [270.0, 90.0, 0.0], [180.0, 0.0, 0.0]], dtype=F64)[:n_dir]
    else:
        euler = torch.zeros(n_dir, 3, dtype=F64)
        euler[:, 0] = 360 * torch.rand(n_dir, generator=g, dtype=F64)
        euler[:, 1] = torch.rad2deg(torch.acos(1 - 2 * torch.rand(n_dir, generator=g,
                                                                   dtype=F64)))
    mats = euler_to_matrix(euler)
    if grid_aligned:
        mats = mats.round()  # exact 0 / +-1 entries (cos 90 deg is 6e-17 in floating point)
    weights = torch.rand(mats.shape[0], generator=g, dtype=F64) + 0.5
    return OrientationQuadrature(
        directions=mats[:, 2, :],
        direction_weights=weights / weights.sum(),
        direction_matrices=mats,
        inplane_angles_rad=torch.arange(n_inplane, dtype=F64) * (2 * math.pi / n_inplane),
    )



def reference_hessians(orientations, ctf, oversampling, shape):
    """Hessians of f with respect to Re B and to Im B (each (E, E), E = number of entries).

    f is quadratic in the real coordinates x: f = sum_r c_r (J_r x)^2 with J the (autograd)
    Jacobian of x -> (Re S, Im S), so H = 2 J^T diag(c) J exactly; two autograd
    Hessian-vector products (double backward of f itself) confirm it on random vectors.
    """
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g, dtype=torch.complex128)  # any point: f is quadratic
    _, coef = slices_and_coefficients(base, orientations, ctf, oversampling)
    weights = torch.cat([coef.reshape(-1), coef.reshape(-1)])
    hessians = []
    for part in ("real", "imag"):
        def embed(x, part=part):
            x = x.reshape(shape)
            return torch.complex(x, base.imag) if part == "real" else torch.complex(base.real, x)

        def as_real_slices(x, embed=embed):
            s, _ = slices_and_coefficients(embed(x), orientations, ctf, oversampling)
            return torch.cat([s.real.reshape(-1), s.imag.reshape(-1)])

        def f(x, embed=embed):
            return pose_averaged_quadratic(embed(x), orientations, ctf, oversampling)

        x0 = getattr(base, part).reshape(-1)
        jac = torch.autograd.functional.jacobian(as_real_slices, x0, vectorize=True)
        hessian = 2 * jac.T @ (weights[:, None] * jac)
        for _ in range(2):
            v = torch.randn(x0.shape, generator=g, dtype=F64)
            _, hv = torch.autograd.functional.hvp(f, x0, v)
            assert torch.allclose(hv, hessian @ v, rtol=1e-10, atol=1e-12 * float(hv.abs().max()))
        hessians.append(hessian)
    return hessians


@pytest.mark.parametrize("grid_aligned", [False, True])
def test_expected_curvature_is_row_sum_of_pose_averaged_hessian(grid_aligned):
    orientations = orientation_set(5, 6, seed=1, grid_aligned=grid_aligned)
    ctf = ctf_set(3, seed=2)
    curvature, os_ = model_curvature(orientations, ctf)
    assert curvature.dtype == F64 and not curvature.is_complex()
    h_re, h_im = reference_hessians(orientations, ctf, os_, tuple(curvature.shape))
    scale = float(curvature.max())
    assert scale > 0
    flat = curvature.reshape(-1)
    # the real and imaginary coordinates have the same curvature and do not couple on the
    # diagonal; the lumped diagonal (row sum) is what expected_curvature returns, factor 1
    assert torch.allclose(h_re, h_im, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(flat, h_re.sum(1), rtol=0, atol=1e-10 * scale)
    diagonal = torch.diagonal(h_re)
    assert bool((diagonal <= flat + 1e-12 * scale).all())  # a >= a^2: row sum majorises
    if grid_aligned:
        # every read weight is 0 or 1: the row sum IS the exact Hessian diagonal
        assert torch.allclose(flat, diagonal, rtol=0, atol=1e-10 * scale)
    else:
        # generic slices: the two differ (documents the lumping, see the module docstring)
        assert float((flat - diagonal).max()) > 0.05 * scale
    # entries no slice reaches have no curvature
    untouched = h_re.abs().sum(1) == 0
    assert untouched.any() and bool((flat[untouched] == 0).all())


def test_fourier_preconditioner_properties():
    orientations = orientation_set(5, 6, seed=3)
    curvature, _ = model_curvature(orientations, ctf_set(3, seed=4))
    floor = 0.05
    p = fourier_preconditioner(curvature, relative_floor=floor)
    h, hmax = curvature, float(curvature.max())
    assert p.shape == h.shape and bool(torch.isfinite(p).all()) and bool((p >= 0).all())
    # P is 1/H relative to the stiffest entry (P * H / max H -> 1 where H >> floor * max H)
    strong = h >= 0.5 * hmax
    assert strong.sum() >= 1
    ratio = (p * h / hmax)[strong]
    assert bool((ratio > 1 / (1 + (floor / 0.5) ** 2) - 1e-12).all())
    assert bool((ratio <= 1 + 1e-12).all())
    top = h == hmax
    assert torch.allclose(p[top], torch.full_like(p[top], 1 / (1 + floor**2)), rtol=1e-12)
    # where nothing is measured the step is zero, and it goes to 0 continuously with H
    assert bool((p[h == 0] == 0).all()) and (h == 0).any()
    weak = (h > 0) & (h < 1e-3 * floor * hmax)
    if weak.any():
        assert float(p[weak].max()) < 2e-3 / floor
    # bounded: the largest value, at H = floor * max H, is 1 / (2 floor)
    assert float(p.max()) <= 1 / (2 * floor) + 1e-12
    # monotone decreasing in H above the floor (a stiffer coordinate never gets a larger step)
    above = h.reshape(-1) >= floor * hmax
    order = torch.argsort(h.reshape(-1)[above])
    assert bool((torch.diff(p.reshape(-1)[above][order]) <= 1e-12).all())
    # negative curvature (round-off) is treated as none
    bumped = curvature.clone()
    bumped.reshape(-1)[0] = -1.0
    assert float(fourier_preconditioner(bumped, floor).reshape(-1)[0]) == 0.0
