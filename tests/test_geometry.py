"""Tests of cryostoch.geometry against independent computations (hand-derived RELION formulas,
scipy.spatial.transform.Rotation, analytic sphere moments, the Haar density)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from scipy.stats import kstest

from cryostoch.geometry import (
    OrientationQuadrature,
    ShiftQuadrature,
    angular_step_rad,
    default_shift_step_px,
    direction_to_euler,
    euler_to_matrix,
    euler_to_quaternion,
    inplane_rotation,
    lebedev_sizes,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_rotvec,
    max_radius_px,
    orientation_quadrature,
    quaternion_multiply,
    quaternion_to_euler,
    quaternion_to_matrix,
    random_rotations,
    rotvec_to_matrix,
    shift_quadrature,
    sphere_rule,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_euler(n: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    rot = torch.rand(n, generator=g, dtype=F64) * 360 - 180
    tilt = torch.rand(n, generator=g, dtype=F64) * 180
    psi = torch.rand(n, generator=g, dtype=F64) * 360 - 180
    return torch.stack([rot, tilt, psi], dim=-1)


def relion_reference(euler_deg: np.ndarray) -> np.ndarray:
    """RELION's Euler_angles2matrix element by element, derived by hand from
    Rz(psi) @ Ry(tilt) @ Rz(rot) with the passive elementary matrices."""
    a, b, g = np.deg2rad(euler_deg).T
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    out = np.empty((len(a), 3, 3))
    out[:, 0, 0] = cg * cb * ca - sg * sa
    out[:, 0, 1] = cg * cb * sa + sg * ca
    out[:, 0, 2] = -cg * sb
    out[:, 1, 0] = -sg * cb * ca - cg * sa
    out[:, 1, 1] = -sg * cb * sa + cg * ca
    out[:, 1, 2] = sg * sb
    out[:, 2, 0] = sb * ca
    out[:, 2, 1] = sb * sa
    out[:, 2, 2] = cb
    return out


def passive_rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def passive_ry(b: float) -> np.ndarray:
    c, s = math.cos(b), math.sin(b)
    return np.array([[c, 0, -s], [0, 1.0, 0], [s, 0, c]])


# --------------------------------------------------------------------------------------------
# Euler angles and matrices
# --------------------------------------------------------------------------------------------

def test_euler_to_matrix_matches_relion_formulas_and_product():
    e = random_euler(200)
    a = euler_to_matrix(e)
    assert a.shape == (200, 3, 3) and a.dtype == F64
    np.testing.assert_allclose(a.numpy(), relion_reference(e.numpy()), atol=1e-14)
    for (rot, tilt, psi), m in zip(np.deg2rad(e[:5].numpy()), a[:5].numpy(), strict=True):
        np.testing.assert_allclose(m, passive_rz(psi) @ passive_ry(tilt) @ passive_rz(rot),
                                   atol=1e-14)


def test_euler_to_matrix_matches_scipy():
    e = random_euler(100, seed=1).numpy()
    a = euler_to_matrix(torch.from_numpy(e)).numpy()
    # A is the inverse of scipy's intrinsic ZYZ rotation with (rot, tilt, psi) ...
    ref1 = Rotation.from_euler("ZYZ", e, degrees=True).inv().as_matrix()
    # ... i.e. the active intrinsic ZYZ rotation by (-psi, -tilt, -rot).
    ref2 = Rotation.from_euler("ZYZ", -e[:, ::-1], degrees=True).as_matrix()
    np.testing.assert_allclose(a, ref1, atol=1e-14)
    np.testing.assert_allclose(a, ref2, atol=1e-14)


def test_euler_to_matrix_batch_shape_dtype_and_integer_input():
    e = random_euler(12).reshape(3, 4, 3)
    assert euler_to_matrix(e).shape == (3, 4, 3, 3)
    assert euler_to_matrix(e.float()).dtype == torch.float32
    np.testing.assert_allclose(euler_to_matrix(torch.tensor([0, 90, 0])).numpy(),
                               [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
    with pytest.raises(ValueError):
        euler_to_matrix(torch.zeros(4, 2))


def test_orthogonal_determinant_one():
    a = euler_to_matrix(random_euler(50))
    eye = torch.eye(3, dtype=F64)
    assert torch.allclose(a @ a.transpose(-1, -2), eye.expand(50, 3, 3), atol=1e-14)
    assert torch.allclose(torch.linalg.det(a), torch.ones(50, dtype=F64), atol=1e-14)


def test_matrix_to_euler_recovers_generic_angles():
    e = random_euler(500, seed=2)
    e[:, 1] = e[:, 1].clamp(1e-3, 180 - 1e-3)
    back = matrix_to_euler(euler_to_matrix(e))
    np.testing.assert_allclose(back.numpy(), e.numpy(), atol=1e-9)


@pytest.mark.parametrize(
    "tilt", [0.0, 180.0, 1e-12, 1e-9, 1e-5, 180 - 1e-12, 180 - 1e-9, 180 - 1e-5, 90.0]
)
def test_matrix_euler_matrix_round_trip_edge_tilts(tilt):
    e = random_euler(64, seed=3)
    e[:, 1] = tilt
    a = euler_to_matrix(e)
    back = matrix_to_euler(a)
    assert torch.all(back[:, 1] >= 0) and torch.all(back[:, 1] <= 180)
    assert torch.all(back[:, 0].abs() <= 180) and torch.all(back[:, 2].abs() <= 180)
    assert torch.allclose(euler_to_matrix(back), a, atol=1e-10, rtol=0)


def test_gimbal_lock_puts_everything_in_psi():
    e = torch.tensor([[30.0, 0.0, 40.0], [30.0, 180.0, 40.0], [-170.0, 0.0, -50.0]], dtype=F64)
    back = matrix_to_euler(euler_to_matrix(e))
    np.testing.assert_allclose(back[:, 0].numpy(), 0.0, atol=0)
    np.testing.assert_allclose(back[:, 1].numpy(), [0.0, 180.0, 0.0], atol=0)
    # tilt = 0: Rz(psi) Rz(rot) = Rz(psi + rot);
    # tilt = 180: Rz(psi) Ry(pi) Rz(rot) = Rz(psi - rot) Ry(pi)
    np.testing.assert_allclose(back[:, 2].numpy(), [70.0, 10.0, 140.0], atol=1e-10)


def test_random_rotation_matrices_round_trip_through_euler():
    a = random_rotations(1000, gen(4))
    assert torch.allclose(euler_to_matrix(matrix_to_euler(a)), a, atol=1e-12, rtol=0)


def test_matrix_to_euler_float32():
    e = random_euler(100, seed=5).float()
    a = euler_to_matrix(e)
    back = matrix_to_euler(a)
    assert back.dtype == torch.float32
    assert torch.allclose(euler_to_matrix(back), a, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------

def test_quaternions_match_scipy_and_are_canonical():
    e = random_euler(300, seed=6)
    a = euler_to_matrix(e)
    q = matrix_to_quaternion(a)
    assert torch.all(q[:, 0] >= 0)
    assert torch.allclose(q.norm(dim=-1), torch.ones(300, dtype=F64), atol=1e-15)
    ref = Rotation.from_matrix(a.numpy()).as_quat(scalar_first=True)
    ref = np.where(ref[:, :1] < 0, -ref, ref)
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-14)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), a.numpy(), atol=1e-14)


def test_euler_to_quaternion_direct_composition():
    e = random_euler(300, seed=7)
    q = euler_to_quaternion(e)
    assert torch.all(q[:, 0] >= 0)
    np.testing.assert_allclose(q.numpy(), matrix_to_quaternion(euler_to_matrix(e)).numpy(),
                               atol=1e-14)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), euler_to_matrix(e).numpy(),
                               atol=1e-14)
    e[:, 1] = e[:, 1].clamp(1e-3, 180 - 1e-3)
    np.testing.assert_allclose(quaternion_to_euler(q).numpy(), e.numpy(), atol=1e-9)


def test_matrix_to_quaternion_edge_cases():
    # identity, 180-degree turns about the axes and a diagonal axis (w = 0), each case of Shepperd
    mats = [np.eye(3), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])]
    mats.append(Rotation.from_rotvec(np.pi * np.array([1, 1, 1]) / np.sqrt(3)).as_matrix())
    mats.append(Rotation.from_rotvec([0, 0, np.pi - 1e-9]).as_matrix())
    a = torch.tensor(np.array(mats))
    q = matrix_to_quaternion(a)
    assert torch.isfinite(q).all()
    assert torch.allclose(quaternion_to_matrix(q), a, atol=1e-14)
    np.testing.assert_allclose(q[0].numpy(), [1, 0, 0, 0], atol=0)


def test_quaternion_multiply_is_matrix_product():
    g = gen(8)
    p = torch.randn(20, 4, generator=g, dtype=F64)
    q = torch.randn(20, 4, generator=g, dtype=F64)
    lhs = quaternion_to_matrix(quaternion_multiply(p, q))
    rhs = quaternion_to_matrix(p) @ quaternion_to_matrix(q)
    assert torch.allclose(lhs, rhs, atol=1e-14)


def test_quaternion_to_matrix_normalises():
    q = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.allclose(quaternion_to_matrix(q), torch.eye(3, dtype=F64))


# --------------------------------------------------------------------------------------------
# Rotation vectors
# --------------------------------------------------------------------------------------------

def test_rotvec_matches_scipy_and_round_trips():
    g = gen(9)
    axis = torch.nn.functional.normalize(torch.randn(300, 3, generator=g, dtype=F64), dim=-1)
    angle = torch.rand(300, 1, generator=g, dtype=F64) * math.pi * 0.999
    v = axis * angle
    a = rotvec_to_matrix(v)
    np.testing.assert_allclose(a.numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(), atol=1e-14)
    np.testing.assert_allclose(matrix_to_rotvec(a).numpy(), v.numpy(), atol=1e-12)
    r = random_rotations(200, gen(10))
    assert torch.allclose(rotvec_to_matrix(matrix_to_rotvec(r)), r, atol=1e-13)


def test_rotvec_small_and_zero_angles():
    v = torch.tensor([[0.0, 0.0, 0.0], [1e-12, 0.0, 0.0], [0.0, 3e-9, -1e-9]], dtype=F64)
    a = rotvec_to_matrix(v)
    np.testing.assert_allclose(a.numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(), atol=1e-16)
    back = matrix_to_rotvec(a)
    assert torch.isfinite(back).all()
    np.testing.assert_allclose(back.numpy(), v.numpy(), atol=1e-15)


def test_rotvec_half_turn():
    v = torch.tensor([[math.pi, 0.0, 0.0], [0.0, 0.0, -math.pi]], dtype=F64)
    a = rotvec_to_matrix(v)
    back = matrix_to_rotvec(a)
    np.testing.assert_allclose(back.norm(dim=-1).numpy(), math.pi, atol=1e-12)
    assert torch.allclose(rotvec_to_matrix(back), a, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Random rotations
# --------------------------------------------------------------------------------------------

def test_random_rotations_reproducible_and_orthogonal():
    a = random_rotations(100, gen(11))
    b = random_rotations(100, gen(11))
    assert torch.equal(a, b)
    assert a.shape == (100, 3, 3) and a.dtype == F64
    assert torch.allclose(a @ a.transpose(-1, -2), torch.eye(3, dtype=F64).expand(100, 3, 3),
                          atol=1e-14)
    assert torch.allclose(torch.linalg.det(a), torch.ones(100, dtype=F64), atol=1e-14)
    assert random_rotations(3, gen(1), dtype=torch.float32).dtype == torch.float32
    assert random_rotations(0, gen(1)).shape == (0, 3, 3)
    with pytest.raises(ValueError):
        random_rotations(-1, gen(1))


def test_random_rotations_are_haar_uniform():
    n = 20000
    r = random_rotations(n, gen(12))
    cos_angle = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    theta = torch.arccos(cos_angle).numpy()
    # Haar density of the rotation angle: 2 sin^2(theta / 2) / pi, CDF (theta - sin theta) / pi
    result = kstest(theta, lambda t: (t - np.sin(t)) / np.pi)
    assert result.pvalue > 1e-3
    # every entry has mean 0 and variance 1/3 under Haar measure
    mean = r.mean(0)
    assert mean.abs().max() < 5 * math.sqrt(1 / 3 / n)
    assert torch.allclose((r**2).mean(0), torch.full((3, 3), 1 / 3, dtype=F64), atol=0.02)


# --------------------------------------------------------------------------------------------
# Directions and in-plane rotations
# --------------------------------------------------------------------------------------------

def test_direction_to_euler_projection_direction():
    g = gen(13)
    d = torch.nn.functional.normalize(torch.randn(500, 3, generator=g, dtype=F64), dim=-1)
    poles = torch.tensor([[0, 0, 1.0], [0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]], dtype=F64)
    d = torch.cat([d, poles])
    e = direction_to_euler(d)
    assert torch.all(e[:, 2] == 0)
    a = euler_to_matrix(e)
    ez = torch.tensor([0, 0, 1.0], dtype=F64)
    beam = a.transpose(-1, -2) @ ez
    assert torch.allclose(beam, d, atol=1e-14)
    # the stated closed form
    rot, tilt = torch.deg2rad(e[:, 0]), torch.deg2rad(e[:, 1])
    closed = torch.stack([tilt.sin() * rot.cos(), tilt.sin() * rot.sin(), tilt.cos()], -1)
    assert torch.allclose(closed, d, atol=1e-14)


def test_inplane_rotation_is_upper_block_of_rz():
    psi = torch.linspace(-4, 4, 17, dtype=F64)
    r2 = inplane_rotation(psi)
    a = euler_to_matrix(torch.stack([torch.zeros_like(psi), torch.zeros_like(psi),
                                     torch.rad2deg(psi)], -1))
    assert torch.allclose(r2, a[..., :2, :2], atol=1e-15)
    # acts on (kx, ky, 0) like the 3-D rotation does
    k = torch.tensor([0.3, -1.2], dtype=F64)
    k3 = torch.tensor([0.3, -1.2, 0.0], dtype=F64)
    assert torch.allclose(r2 @ k, (a @ k3)[..., :2], atol=1e-15)


# --------------------------------------------------------------------------------------------
# Sphere rules
# --------------------------------------------------------------------------------------------

def _mean(points: torch.Tensor, weights: torch.Tensor, f) -> float:
    x, y, z = points.unbind(-1)
    return float((weights * f(x, y, z)).sum())


def test_lebedev_sizes_scanned_from_scipy():
    all_sizes = lebedev_sizes(positive_weights_only=False)
    assert all_sizes[0] == 6 and all_sizes[-1] == 5810 and len(all_sizes) == 32
    positive = lebedev_sizes()
    assert set(all_sizes) - set(positive) == {74, 230, 266}


@pytest.mark.parametrize("n", lebedev_sizes())
def test_lebedev_rules_integrate_polynomials_exactly(n):
    p, w = sphere_rule(n)
    assert p.shape == (n, 3) and w.shape == (n,)
    assert abs(float(w.sum()) - 1) < 1e-14 and bool((w > 0).all())
    assert torch.allclose(p.norm(dim=-1), torch.ones(n, dtype=F64), atol=1e-14)
    checks = [(lambda x, y, z: x * x, 1 / 3), (lambda x, y, z: z, 0.0),
              (lambda x, y, z: x * y, 0.0)]
    if n >= 14:  # degree >= 5
        checks += [(lambda x, y, z: x**4, 1 / 5), (lambda x, y, z: x**2 * y**2, 1 / 15),
                   (lambda x, y, z: y**2 * z**2, 1 / 15), (lambda x, y, z: x * y * z**3, 0.0)]
    if n >= 26:  # degree >= 7
        checks += [(lambda x, y, z: x**6, 1 / 7), (lambda x, y, z: x**2 * y**2 * z**2, 1 / 105)]
    for f, expected in checks:
        assert abs(_mean(p, w, f) - expected) < 1e-13


def test_sphere_rule_selection():
    assert sphere_rule(1)[0].shape[0] == 6
    assert sphere_rule(590)[0].shape[0] == 590
    assert sphere_rule(590.5)[0].shape[0] == 770
    assert sphere_rule(60)[0].shape[0] == 86  # 74-point rule has negative weights: skipped
    assert sphere_rule(60, positive_weights_only=False)[0].shape[0] == 74
    assert sphere_rule(5810)[0].shape[0] == 5810
    p, w = sphere_rule(100, dtype=torch.float32)
    assert p.dtype == torch.float32 and w.dtype == torch.float32
    for bad in (0, -3, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError):
            sphere_rule(bad)


def test_fibonacci_fallback_above_largest_rule():
    p, w = sphere_rule(8000.2)
    assert p.shape == (8001, 3)
    assert torch.allclose(w, torch.full((8001,), 1 / 8001, dtype=F64))
    assert torch.allclose(p.norm(dim=-1), torch.ones(8001, dtype=F64), atol=1e-14)
    for f, expected in [(lambda x, y, z: x * x, 1 / 3), (lambda x, y, z: z * z, 1 / 3),
                        (lambda x, y, z: x, 0.0), (lambda x, y, z: z, 0.0),
                        (lambda x, y, z: x**4, 1 / 5), (lambda x, y, z: x**2 * y**2, 1 / 15)]:
        assert abs(_mean(p, w, f) - expected) < 1e-3
    # near-uniform: nearest-neighbour distances are all of the same size
    nn = torch.cdist(p[::4], p).topk(2, largest=False).values[:, 1]
    assert float(nn.max() / nn.min()) < 2.0
    assert sphere_rule(5811)[0].shape[0] == 5811


# --------------------------------------------------------------------------------------------
# Orientation quadrature
# --------------------------------------------------------------------------------------------

def test_step_helpers():
    assert max_radius_px(128, 0.16) == pytest.approx(10.24)
    assert max_radius_px(128, 0.10) == pytest.approx(6.4)
    assert angular_step_rad(10.24) == pytest.approx(math.atan(1 / 10.24))
    assert default_shift_step_px(128, 10.24) == pytest.approx(128 / (2 * math.pi * 10.24))
    # a shift of one step moves the phase at radius r by one radian: 2 pi r t / N = 1
    t = default_shift_step_px(96, 7.5)
    assert 2 * math.pi * 7.5 * t / 96 == pytest.approx(1.0)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            angular_step_rad(bad)
    for args in [(0, 0.1), (128, 0.0), (128, 1.5), (127.5, 0.1)]:
        with pytest.raises(ValueError):
            max_radius_px(*args)
    with pytest.raises(ValueError):
        default_shift_step_px(128, 0)


@pytest.mark.parametrize(("fraction", "n_dir", "n_psi"), [(0.16, 1454, 65), (0.10, 590, 41)])
def test_orientation_quadrature_paper_sizes(fraction, n_dir, n_psi):
    q = orientation_quadrature(max_radius_px(128, fraction))
    assert isinstance(q, OrientationQuadrature)
    assert (q.n_directions, q.n_inplane, q.size) == (n_dir, n_psi, n_dir * n_psi)
    assert q.directions.shape == (n_dir, 3) and q.direction_matrices.shape == (n_dir, 3, 3)
    assert abs(float(q.direction_weights.sum()) - 1) < 1e-13
    assert torch.allclose(q.inplane_angles_rad,
                          torch.arange(n_psi, dtype=F64) * (2 * math.pi / n_psi))
    lw = q.log_weights()
    assert lw.shape == (q.size,)
    assert abs(float(torch.logsumexp(lw, 0))) < 1e-12


def test_orientation_quadrature_index_layout_and_consistency():
    q = orientation_quadrature(4.0)
    p = q.n_inplane
    m = q.matrices()
    e = q.euler_deg()
    lw = q.log_weights()
    assert m.shape == (q.size, 3, 3) and e.shape == (q.size, 3)
    assert torch.allclose(euler_to_matrix(e), m, atol=1e-14)
    # flat index d * P + p is Rz(psi_p) @ A_d
    for d, k in [(0, 0), (3, 2), (q.n_directions - 1, p - 1)]:
        psi = float(q.inplane_angles_rad[k])
        ref = torch.from_numpy(passive_rz(psi)) @ q.direction_matrices[d]
        assert torch.allclose(m[d * p + k], ref, atol=1e-14)
        assert lw[d * p + k] == pytest.approx(math.log(float(q.direction_weights[d]) / p))
        assert e[d * p + k, 2] == pytest.approx(math.degrees(psi))
    # every rotation of direction d projects along direction d
    ez = torch.tensor([0, 0, 1.0], dtype=F64)
    beam = (m.transpose(-1, -2) @ ez).reshape(q.n_directions, p, 3)
    assert torch.allclose(beam, q.directions[:, None, :].expand(-1, p, 3), atol=1e-14)


def test_orientation_quadrature_integrates_over_so3():
    # mean of R over SO(3) is 0 and mean of R_ij^2 is 1/3 (Haar)
    q = orientation_quadrature(3.0)
    w = q.log_weights().exp()
    m = q.matrices()
    mean = (w[:, None, None] * m).sum(0)
    second = (w[:, None, None] * m**2).sum(0)
    assert mean.abs().max() < 1e-12
    assert torch.allclose(second, torch.full((3, 3), 1 / 3, dtype=F64), atol=1e-12)


def test_orientation_quadrature_dtype_and_large_fallback():
    q = orientation_quadrature(6.4, dtype=torch.float32)
    assert q.matrices().dtype == torch.float32 and q.log_weights().dtype == torch.float32
    big = orientation_quadrature(30.0)  # (3.6 / atan(1/30))^2 ~ 11669 > 5810
    step = math.atan(1 / 30)
    assert big.n_directions == math.ceil((3.6 / step) ** 2)
    assert big.n_inplane == math.ceil(2 * math.pi / step)
    with pytest.raises(ValueError):
        orientation_quadrature(0.0)


# --------------------------------------------------------------------------------------------
# Shift quadrature
# --------------------------------------------------------------------------------------------

def test_shift_quadrature_origin_only():
    s = shift_quadrature(0.0, 1.0, 2.0)
    assert isinstance(s, ShiftQuadrature)
    assert s.shifts_px.tolist() == [[0.0, 0.0]] and s.log_weights.tolist() == [0.0]
    s = shift_quadrature(0.5, 1.0, float("inf"))
    assert s.size == 1


def test_shift_quadrature_uniform_disc():
    s = shift_quadrature(3.0, 1.0, float("inf"))
    # lattice points with i^2 + j^2 <= 9: 29
    assert s.size == 29
    assert torch.allclose(s.log_weights, torch.full((29,), -math.log(29), dtype=F64))
    assert (s.shifts_px.norm(dim=-1) <= 3 + 1e-12).all()
    assert (s.shifts_px == 0).all(dim=-1).sum() == 1
    # brute-force count for a non-integer step
    s = shift_quadrature(2.0, 0.7, float("inf"))
    ref = sum(1 for i in range(-5, 6) for j in range(-5, 6) if (0.7 * i)**2 + (0.7 * j)**2 <= 4)
    assert s.size == ref


def test_shift_quadrature_truncated_normal_weights():
    sigma = 1.5
    s = shift_quadrature(4.0, 0.8, sigma)
    r2 = (s.shifts_px**2).sum(-1)
    ref = torch.exp(-r2 / (2 * sigma**2))
    ref = ref / ref.sum()
    assert torch.allclose(s.log_weights.exp(), ref, atol=1e-15)
    assert abs(float(torch.logsumexp(s.log_weights, 0))) < 1e-14
    # grid multiples of the step; the origin carries the largest weight
    assert torch.allclose(s.shifts_px / 0.8, (s.shifts_px / 0.8).round(), atol=1e-12)
    assert int(s.log_weights.argmax()) == int((r2 == 0).nonzero())
    s32 = shift_quadrature(4.0, 0.8, sigma, dtype=torch.float32)
    assert s32.shifts_px.dtype == torch.float32 and s32.size == s.size


@pytest.mark.parametrize(
    "args",
    [(-1.0, 1.0, 1.0), (float("nan"), 1.0, 1.0), (2.0, 0.0, 1.0), (2.0, -1.0, 1.0),
     (2.0, float("inf"), 1.0), (2.0, 1.0, 0.0), (2.0, 1.0, -1.0), (2.0, 1.0, float("nan"))],
)
def test_shift_quadrature_validation(args):
    with pytest.raises(ValueError):
        shift_quadrature(*args)
