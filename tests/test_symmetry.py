"""Point groups in RELION's conventions, symmetrised maps and the asymmetric unit of the direction
quadrature, against independent results: RELION's axis table (src/symmetries.cpp), the class
equations of the groups, analytic Gaussian-blob maps and Haar integrals over SO(3)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from cryostoch.evaluate.transform import rotate_volume, soft_sphere_mask
from cryostoch.fourier import soft_low_pass
from cryostoch.geometry import (
    direction_to_euler,
    euler_to_matrix,
    orientation_quadrature,
    sphere_rule,
)
from cryostoch.geometry.symmetry import (
    PointGroup,
    asymmetric_unit_directions,
    point_group,
    restrict_orientation_quadrature,
    symmetrize_volume,
)

F64 = torch.float64

# RELION's rot_axis lines (fold, axis) as printed in SymList::fill_symmetry_class.
RELION_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    "I": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)),
           (3, (0, 0.356822076, 0.934172364))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "C7": [(7, (0, 0, 1))],
    "D5": [(5, (0, 0, 1)), (2, (1, 0, 0))],
}
ORDERS = {"C1": 1, "C2": 2, "C7": 7, "C12": 12, "D1": 2, "D2": 4, "D5": 10, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}
# rotation angle (degrees) -> number of elements: the class equations of the groups
ANGLE_COUNTS = {
    "T": {0: 1, 120: 8, 180: 3},
    "O": {0: 1, 90: 6, 120: 8, 180: 9},
    "I": {0: 1, 72: 12, 120: 20, 144: 12, 180: 15},
    "D5": {0: 1, 72: 2, 144: 2, 180: 5},
    "D2": {0: 1, 180: 3},
}


def index_of(group: PointGroup, matrix: torch.Tensor) -> tuple[int, float]:
    """Index of the group element nearest to `matrix` and its max-abs distance."""
    dist = (group.matrices - matrix).abs().amax(dim=(-2, -1))
    return int(dist.argmin()), float(dist.min())


# ---------------------------------------------------------------------------------------------
# The groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_order_closure_and_determinants(name):
    group = point_group(name)
    m = group.matrices
    assert group.order == ORDERS[name] and m.dtype == F64
    assert torch.equal(m[0], torch.eye(3, dtype=F64))
    assert torch.allclose(m @ m.transpose(-1, -2), torch.eye(3, dtype=F64).expand_as(m),
                          atol=1e-12)
    assert torch.allclose(torch.linalg.det(m), torch.ones(group.order, dtype=F64), atol=1e-12)
    products = (m[:, None] @ m[None]).reshape(-1, 3, 3)
    dist = (products[:, None] - m[None]).abs().amax(dim=(-2, -1)).min(dim=1).values
    assert float(dist.max()) < 1e-9  # every product is in the set
    gaps = (m[:, None] - m[None]).abs().amax(dim=(-2, -1)) + 10 * torch.eye(group.order)
    assert float(gaps.min()) > 0.1  # no element twice


@pytest.mark.parametrize("name", sorted(RELION_AXES))
def test_axes_where_relion_puts_them(name):
    group = point_group(name.lower())  # names are case-insensitive
    for fold, axis in RELION_AXES[name]:
        a = torch.tensor(axis, dtype=F64)
        for k in range(1, fold):
            rotvec = (a / a.norm() * (2 * math.pi * k / fold)).numpy()
            r = torch.from_numpy(Rotation.from_rotvec(rotvec).as_matrix())
            assert index_of(group, r)[1] < 1e-5, (name, fold, axis, k)


@pytest.mark.parametrize("name", sorted(ANGLE_COUNTS))
def test_class_equation(name):
    m = point_group(name).matrices
    angles = torch.rad2deg(torch.arccos(((m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2)
                                        .clamp(-1, 1))).round().long()
    counts = {int(a): int(c) for a, c in zip(*torch.unique(angles, return_counts=True),
                                             strict=True)}
    assert counts == ANGLE_COUNTS[name]


def test_cyclic_group_is_rotations_about_z_and_i_is_i2():
    n = 6
    group = point_group("c6")
    for k in range(n):
        r = torch.from_numpy(Rotation.from_rotvec([0, 0, 2 * math.pi * k / n]).as_matrix())
        assert index_of(group, r)[1] < 1e-12
    i, i2 = point_group("I"), point_group("i2")
    assert i.name == "I" and i2.name == "I2"
    assert torch.allclose(i.matrices, i2.matrices, atol=1e-12)


@pytest.mark.parametrize("name", ["X2", "C0", "D", "Cs", "ci", "C2v", "D3h", "S4", "Td", "Oh",
                                  "Ih", "I2h", "I5", "", "C-2"])
def test_unknown_or_improper_names_raise(name):
    with pytest.raises(ValueError, match="point group") as info:
        point_group(name)
    assert repr(name) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Symmetrised maps
# ---------------------------------------------------------------------------------------------


def blobs(n: int, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """(n, n, n) sum of unit Gaussians at `centres` (K, 3) = (x, y, z) from the centre n // 2."""
    k = torch.arange(n, dtype=F64) - n // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    grid = torch.stack([x, y, z], dim=-1)  # (n, n, n, 3)
    d2 = ((grid[..., None, :] - centres) ** 2).sum(-1)  # (n, n, n, K)
    return torch.exp(-d2 / (2 * sigma * sigma)).sum(-1)


CENTRES = torch.tensor([[6.0, 2.0, 3.5], [-2.0, 5.0, -4.0]], dtype=F64)


@pytest.mark.parametrize("name", ["C3", "D2", "T", "O"])
def test_symmetrize_a_blob_gives_the_analytic_orbit_average(name):
    """symmetrize(blob at c) = (1/|G|) sum_g blob at g c, and an orbit map is invariant."""
    n, sigma = 32, 2.0
    group = point_group(name)
    orbit = (group.matrices[:, None] @ CENTRES[..., None])[..., 0].reshape(-1, 3)
    expected = blobs(n, orbit, sigma) / group.order
    got = symmetrize_volume(blobs(n, CENTRES, sigma), group)
    scale = float(expected.abs().max())
    # trilinear resampling (after 2x upsampling) blurs a sigma = 2 px blob by ~1% of its peak
    assert float((got - expected).abs().max()) < 0.02 * scale
    invariant = symmetrize_volume(expected, group)
    assert float((invariant - expected).abs().max()) < 0.02 * scale


def smooth_random_map(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, n, n, generator=g, dtype=F64)
    return soft_low_pass(noise, n / 6, 2.0, 3) * soft_sphere_mask(n, n / 3, edge_px=3, dtype=F64)


def norms(volumes: torch.Tensor) -> torch.Tensor:
    return volumes.square().sum(dim=(-3, -2, -1)).sqrt()


def test_symmetrize_twice_equals_once():
    n = 32
    group = point_group("D3")
    once = symmetrize_volume(smooth_random_map(n, 1), group)
    twice = symmetrize_volume(once, group)
    assert float((twice - once).norm() / once.norm()) < 0.02


@pytest.mark.parametrize("name", ["C4", "D2", "T"])
def test_symmetrized_random_map_is_invariant_under_every_element(name):
    n = 32
    group = point_group(name)
    volume = smooth_random_map(n, 2)
    sym = symmetrize_volume(volume, group)
    # the random map itself is far from symmetric, so the test can fail
    before = rotate_volume(volume[None], group.matrices[1:], oversampling=2)
    assert float((norms(before - volume) / volume.norm()).min()) > 0.5
    after = rotate_volume(sym[None], group.matrices, oversampling=2)
    rel = norms(after - sym) / sym.norm()
    assert float(rel.max()) < 0.03


# ---------------------------------------------------------------------------------------------
# Asymmetric unit of directions
# ---------------------------------------------------------------------------------------------


def invariant_sphere_function(group: PointGroup, directions: torch.Tensor) -> torch.Tensor:
    """f(d) = sum_g h(g d) with a smooth, non-symmetric h (exp of a quadratic form)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, generator=g, dtype=F64)
    q = torch.randn(3, 3, generator=g, dtype=F64)
    images = directions @ group.matrices.transpose(-1, -2)  # (G, D, 3): g d
    return torch.exp(images @ a + ((images @ q) * images).sum(-1)).sum(0)


def orbit_rule(group: PointGroup, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A G-invariant rule: the orbits of random points, of points on the unit's boundary and of
    the symmetry axes (listed once per group element), with orbit-constant weights."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 3, generator=g, dtype=F64)
    kept, _ = asymmetric_unit_directions(base, torch.ones(6, dtype=F64) / 6, group)
    inside = base[kept[:1]]
    # a point on the bisector of an inside point and one of its images lies on the boundary
    boundary = inside + inside @ group.matrices[-1].T
    axes = torch.linalg.eigh(group.matrices[1:] + group.matrices[1:].transpose(-1, -2))[1][..., -1]
    base = torch.cat([base, boundary, axes])
    base = base / base.norm(dim=-1, keepdim=True)
    points = (base @ group.matrices.transpose(-1, -2)).reshape(-1, 3)
    weights = torch.rand(base.shape[0], generator=g, dtype=F64).repeat(group.order)
    return points, weights / weights.sum()


@pytest.mark.parametrize("name", ["C1", "C5", "D1", "D4", "T", "O", "I", "I1", "I3", "I4"])
def test_asymmetric_unit_is_exact_for_an_invariant_rule(name):
    group = point_group(name)
    points, weights = orbit_rule(group, seed=3)
    kept, new = asymmetric_unit_directions(points, weights, group)
    f = invariant_sphere_function(group, points)
    assert float(new.sum()) == pytest.approx(1.0, abs=1e-13)
    assert float((new * f[kept]).sum()) == pytest.approx(float((weights * f).sum()), rel=1e-12)
    # every point of the rule has an image among the kept ones (nothing is lost)
    images = points @ group.matrices.transpose(-1, -2)  # (G, P, 3)
    nearest = torch.cdist(images.reshape(-1, 3), points[kept]).amin(dim=1)
    assert float(nearest.reshape(group.order, -1).amin(dim=0).max()) < 1e-6  # cdist: ~1e-8


@pytest.mark.parametrize("name", ["C2", "C4", "D2", "D4", "O"])
def test_asymmetric_unit_of_lebedev_is_exact_for_its_subgroups(name):
    """Lebedev rules have the octahedral symmetry of the axes, so these groups keep them exact
    (boundary points on the coordinate planes share their weight)."""
    group = point_group(name)
    d, w = sphere_rule(302)
    kept, new = asymmetric_unit_directions(d, w, group)
    f = invariant_sphere_function(group, d)
    assert float((new * f[kept]).sum()) == pytest.approx(float((w * f).sum()), rel=1e-12)
    assert len(kept) < 1.25 * len(d) / group.order + 4


@pytest.mark.parametrize("name", ["C3", "D5", "T", "I"])
def test_images_of_generic_directions_fall_once_in_the_unit(name):
    group = point_group(name)
    d = torch.randn(200, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    images = (d @ group.matrices.transpose(-1, -2)).reshape(-1, 3)
    kept, new = asymmetric_unit_directions(images, torch.ones(len(images), dtype=F64), group)
    assert len(kept) == len(d)
    assert torch.equal(torch.sort(kept % len(d)).values, torch.arange(len(d)))
    assert torch.allclose(new, torch.full_like(new, 1 / len(d)))


def test_cyclic_and_dihedral_units_are_relions_wedges():
    """Cn: 0 <= rot <= 360/n; Dn: the same wedge above the equator (tilt <= 90)."""
    d, w = sphere_rule(1000)
    rot = torch.rad2deg(torch.atan2(d[:, 1], d[:, 0])) % 360
    for name, n, hemisphere in (("C3", 3, False), ("D3", 3, True)):
        kept, _ = asymmetric_unit_directions(d, w, point_group(name))
        inside = (rot <= 360 / n + 1e-9) | (rot >= 360 - 1e-9) | (d[:, 2].abs() > 1 - 1e-12)
        if hemisphere:
            inside &= d[:, 2] >= -1e-12
        strict = torch.zeros(len(d), dtype=torch.bool)
        strict[kept] = True
        assert torch.equal(strict, inside)


def so3_functions(group: PointGroup, matrices: torch.Tensor, scale: float):
    """f(R) = mean_g h(R g) (right-invariant, what a symmetric map's projections are) and the
    left-symmetrised mean_g h(g R), for h(R) = exp(<B, R>) with a random B of norm `scale`."""
    b = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    b = scale * b / b.norm()
    right = b @ group.matrices.transpose(-1, -2)  # <B, R g> = <B g^T, R>
    left = group.matrices.transpose(-1, -2) @ b  # <B, g R> = <g^T B, R>
    flat = matrices.reshape(-1, 9)
    return (torch.exp(flat @ right.reshape(-1, 9).T).mean(1),
            torch.exp(flat @ left.reshape(-1, 9).T).mean(1))


@pytest.mark.parametrize(("name", "scale", "tol", "control"), [
    ("C3", 6.0, 2e-3, True), ("D2", 6.0, 1e-12, True), ("T", 6.0, 2e-2, True),
    ("O", 6.0, 1e-12, True), ("I", 6.0, 3e-2, False),
])
def test_restricted_orientation_quadrature_integrates_symmetric_functions(name, scale, tol,
                                                                          control):
    group = point_group(name)
    full = orientation_quadrature(8.0)
    part = restrict_orientation_quadrature(full, group)
    assert part.n_inplane == full.n_inplane
    ratio = full.n_directions / part.n_directions
    assert 0.75 * group.order < ratio < 1.25 * group.order
    w_full, w_part = full.log_weights().exp(), part.log_weights().exp()
    right, left = so3_functions(group, full.matrices(), scale)
    right_part, left_part = so3_functions(group, part.matrices(), scale)
    mean = (w_full * right).sum()
    spread = (w_full * (right - mean) ** 2).sum().sqrt()  # errors relative to f's variation
    assert abs(float((w_part * right_part).sum() - mean)) < tol * float(spread)
    if control:  # the left-symmetrised function is not invariant under R -> R g: it fails
        mean_left = (w_full * left).sum()
        assert abs(float((w_part * left_part).sum() - mean_left)) > 0.05 * float(spread)


def test_right_multiplication_moves_the_direction_to_g_transpose_d():
    """A g = Rz(psi') A_{g^T d}: the projection direction of A g is g^T d (A = Rz(psi) A_d) and
    the rest is an in-plane turn; left multiplication g A is not of this form."""
    a = orientation_quadrature(3.0).matrices()[::7]  # (M, 3, 3)
    d = a[:, 2, :]  # A^T e_z is the last row of A
    for g in point_group("T").matrices[1:]:
        moved = d @ g  # rows (g^T d)^T
        assert torch.allclose((a @ g)[:, 2, :], moved, atol=1e-12)
        turn = (a @ g) @ euler_to_matrix(direction_to_euler(moved)).transpose(-1, -2)
        assert torch.allclose(turn[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=F64), atol=1e-9)
        assert float(((g @ a)[:, 2, :] - moved).norm(dim=-1).max()) > 0.5


@pytest.mark.parametrize("name", ["C2", "D2", "C4", "D4", "O"])
def test_axis_permuting_groups_symmetrize_exactly_without_interpolation(name):
    """For groups of signed permutation matrices the voxel permutation path equals the
    interpolating rotation of a band-limited map (to rounding) and is idempotent."""
    from cryostoch.evaluate.transform import rotate_volume
    from cryostoch.fourier.resample import soft_low_pass
    from cryostoch.geometry.symmetry import is_signed_permutation_group

    group = point_group(name)
    assert is_signed_permutation_group(group)
    g = torch.Generator().manual_seed(1)
    volume = soft_low_pass(torch.randn(32, 32, 32, generator=g, dtype=torch.float64), 6, 2.0,
                           ndim=3)
    exact = symmetrize_volume(volume, group)
    total = volume.clone()
    for matrix in group.matrices[1:]:
        total += rotate_volume(volume, matrix, oversampling=2)
    assert torch.allclose(exact, total / group.order, atol=1e-12 * float(exact.abs().max()))
    # idempotent away from the outermost planes (whose images leave the box, reading 0)
    again = symmetrize_volume(exact, group)
    assert torch.allclose(again[1:, 1:, 1:], exact[1:, 1:, 1:], rtol=0,
                          atol=1e-13 * float(exact.abs().max()))
    assert not is_signed_permutation_group(point_group("C3"))
