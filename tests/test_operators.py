"""Forward-model operators against independent references."""

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from cryostoch.fourier import (
    PrunedDft,
    SpectrumLayout,
    dft_matrix,
    fft2_grid,
    fft2c,
    fft3_grid,
    half_plane_coefficients,
    rfft2c,
    rfft3c,
)
from cryostoch.operators import (
    CtfParameters,
    cubic_interpolation_matrix,
    electron_wavelength_a,
    evaluate_ctf,
    extract_slices,
    extract_slices_sampled,
    hermitian_extend,
    inplane_sample_points,
    insert_slice_weights,
    insert_slices,
    insert_slices_and_weights,
    sample_blocks,
    shift_images,
    shift_phases,
)

gen = torch.Generator().manual_seed(7)


def relion_matrix(rot_deg: float, tilt_deg: float, psi_deg: float) -> torch.Tensor:
    """RELION's Euler_angles2matrix written out element by element (independent reference)."""
    a, b, g = (math.radians(v) for v in (rot_deg, tilt_deg, psi_deg))
    ca, sa, cb, sb, cg, sg = (
        math.cos(a),
        math.sin(a),
        math.cos(b),
        math.sin(b),
        math.cos(g),
        math.sin(g),
    )
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return torch.tensor(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ],
        dtype=torch.float64,
    )


def random_rotations(n: int, seed: int) -> torch.Tensor:
    return torch.as_tensor(Rotation.random(n, random_state=seed).as_matrix())


# ------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("oversampling", [1, 2])
def test_extraction_and_insertion_are_adjoint_in_float64(oversampling):
    shape = (17, 17, 9)
    volume = torch.randn(shape, generator=gen, dtype=torch.complex128)
    rotations = random_rotations(11, 0)
    coeffs = half_plane_coefficients(32, 7.5)
    kx, ky = coeffs.kx / oversampling * 1.0, coeffs.ky / oversampling * 1.0
    u = torch.randn(11, coeffs.n_points, generator=gen, dtype=torch.complex128)
    lhs = (extract_slices(volume, rotations, kx, ky, oversampling).conj() * u).sum().real
    rhs = (volume.conj() * insert_slices(u, rotations, kx, ky, shape, oversampling)).sum().real
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("oversampling", [1, 2])
def test_sampled_extraction_equals_the_stencil_reads_and_its_adjoint_is_insertion(oversampling):
    """grid_sample's reads equal the explicit trilinear stencil (an independent code path),
    points near and beyond the block's edge included, and their autograd adjoint is
    `insert_slices`."""
    shape = (17, 17, 9)
    volume = torch.randn(shape, generator=gen, dtype=torch.complex128, requires_grad=True)
    rotations = random_rotations(6, 3).reshape(2, 3, 3, 3)  # any leading shape
    coeffs = half_plane_coefficients(32, 8.4)  # reaches past the block's last sample
    kx, ky = coeffs.kx / oversampling, coeffs.ky / oversampling
    fast = extract_slices_sampled(volume, rotations, kx, ky, oversampling)
    reference = extract_slices(volume.detach(), rotations, kx, ky, oversampling)
    assert fast.shape == (2, 3, coeffs.n_points)
    assert torch.allclose(fast, reference, atol=1e-12)
    u = torch.randn(fast.shape, generator=gen, dtype=torch.complex128)
    (grad,) = torch.autograd.grad(fast, volume, grad_outputs=u)
    expected = insert_slices(u.reshape(6, -1), rotations.reshape(6, 3, 3), kx, ky, shape,
                             oversampling)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_autograd_backward_of_extraction_is_insertion():
    shape = (9, 9, 5)
    volume = torch.randn(shape, generator=gen, dtype=torch.complex128, requires_grad=True)
    rotations = random_rotations(4, 1)
    coeffs = half_plane_coefficients(16, 3.5)
    u = torch.randn(4, coeffs.n_points, generator=gen, dtype=torch.complex128)
    out = extract_slices(volume, rotations, coeffs.kx, coeffs.ky)
    (grad,) = torch.autograd.grad(out, volume, grad_outputs=u)
    assert torch.allclose(grad, insert_slices(u, rotations, coeffs.kx, coeffs.ky, shape))


def test_weight_insertion_matches_complex_insertion_of_real_values():
    shape = (9, 9, 5)
    rotations = random_rotations(3, 2)
    coeffs = half_plane_coefficients(16, 3.5)
    w = torch.rand(3, coeffs.n_points, generator=gen, dtype=torch.float64)
    ref = insert_slices(w.to(torch.complex128), rotations, coeffs.kx, coeffs.ky, shape).real
    assert torch.allclose(insert_slice_weights(w, rotations, coeffs.kx, coeffs.ky, shape), ref)


@pytest.mark.parametrize("oversampling", [1, 2])
def test_fused_insertion_is_the_adjoint_of_the_sampled_reads(oversampling):
    """`insert_slices_and_weights` accumulates, in place, the adjoint of grid_sample's reads
    (autograd of `extract_slices_sampled`, an independent code path) for the complex values
    and for the real weights, points past the block's edge included."""
    shape = (17, 17, 9)
    rotations = random_rotations(5, 4)
    coeffs = half_plane_coefficients(32, 8.4)
    kx, ky = coeffs.kx / oversampling, coeffs.ky / oversampling
    u = torch.randn(5, coeffs.n_points, generator=gen, dtype=torch.complex128)
    w = torch.rand(5, coeffs.n_points, generator=gen, dtype=torch.float64)
    start = torch.randn(shape, generator=gen, dtype=torch.complex128)
    numerator, weight_grid = start.clone(), start.real.clone()
    insert_slices_and_weights(numerator, weight_grid, u, w, rotations, kx, ky, oversampling)
    probe = torch.zeros(shape, dtype=torch.complex128, requires_grad=True)
    reads = extract_slices_sampled(probe, rotations, kx, ky, oversampling)
    (expected,) = torch.autograd.grad(reads, probe, grad_outputs=u)
    assert torch.allclose(numerator - start, expected, atol=1e-12)
    real_probe = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    reads = extract_slices_sampled(real_probe.to(torch.complex128), rotations, kx, ky,
                                   oversampling)
    # a real volume read at Hermitian-flipped points is still real: the weights' adjoint
    (expected_w,) = torch.autograd.grad(reads.real, real_probe, grad_outputs=w)
    assert torch.allclose(weight_grid - start.real, expected_w, atol=1e-12)


def gaussian_blobs(n: int, centres: torch.Tensor, sigma: float, amps: torch.Tensor):
    """Volume [z, y, x] of isotropic Gaussians; centres (K, 3) as (x, y, z) from the centre."""
    z, y, x = fft3_grid(n)
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for c, a in zip(centres, amps, strict=True):
        vol += a * torch.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2)
        )
    return vol


def analytic_projection(n: int, rotation: torch.Tensor, centres, sigma: float, amps):
    """RELION projection img(x, y) = integral V(A^T (x, y, z)) dz of the blobs: a blob at c lands
    at (A c)_xy with its line integral a * sigma * sqrt(2 pi)."""
    y, x = fft2_grid(n)
    img = torch.zeros(n, n, dtype=torch.float64)
    moved = centres @ rotation.T
    for c, a in zip(moved, amps, strict=True):
        img += (
            a
            * sigma
            * math.sqrt(2 * math.pi)
            * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * sigma**2))
        )
    return img


@pytest.mark.parametrize("oversampling,tolerance", [(2, 0.04), (3, 0.02), (4, 0.01)])
def test_fourier_slice_theorem_matches_real_space_projection(oversampling, tolerance):
    n, sigma, radius = 32, 1.6, 6.0
    centres = torch.tensor(
        [[5.0, -2.0, 3.0], [-4.0, 4.0, -1.0], [0.0, -5.0, -4.0], [2, 6, 0]], dtype=torch.float64
    )
    amps = torch.tensor([1.0, 0.7, 1.3, 0.5], dtype=torch.float64)
    volume = gaussian_blobs(n, centres, sigma, amps)
    layout = SpectrumLayout(n, radius + 1.0, oversampling)
    block = PrunedDft.create(layout, dtype=torch.float64).volume(volume)
    coeffs = half_plane_coefficients(n, radius)
    rows, cols = coeffs.rfft_indices()
    for angles in [
        (0.0, 0.0, 0.0),
        (30.0, 60.0, 10.0),
        (-120.0, 135.0, 250.0),
        (77.0, 20.0, -40.0),
    ]:
        a = relion_matrix(*angles)
        model = extract_slices(block, a[None], coeffs.kx, coeffs.ky, oversampling)[0] * math.sqrt(n)
        reference = rfft2c(analytic_projection(n, a, centres, sigma, amps))[rows, cols]
        error = (model - reference).abs().norm() / reference.abs().norm()
        assert error < tolerance, (angles, error)


def test_euler_convention_moves_a_blob_where_relion_puts_it():
    # rot = 90 about z: a blob on +x moves to -y in the image (passive rotation, as RELION).
    n, sigma = 32, 1.5
    centres = torch.tensor([[6.0, 0.0, 0.0]], dtype=torch.float64)
    amps = torch.ones(1, dtype=torch.float64)
    a = relion_matrix(90.0, 0.0, 0.0)
    img = analytic_projection(n, a, centres, sigma, amps)
    peak = torch.nonzero(img == img.max())[0]
    assert (peak - n // 2).tolist() == [-6, 0]  # row (y) = -6, column (x) = 0
    volume = gaussian_blobs(n, centres, sigma, amps)
    spectrum = rfft3c(volume)
    coeffs = half_plane_coefficients(n, 10.0)
    rows, cols = coeffs.rfft_indices()
    model = extract_slices(spectrum, a[None], coeffs.kx, coeffs.ky)[0] * math.sqrt(n)
    ref = rfft2c(img)[rows, cols]
    assert (model - ref).abs().max() < 1e-6 * ref.abs().max()  # 90 deg maps grid onto grid


# ----------------------------------------------------------------------------------- CTF
def test_electron_wavelength_at_300_and_200_kv():
    assert electron_wavelength_a(300.0).item() == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength_a(200.0).item() == pytest.approx(0.025079, abs=5e-7)


def ctf_params(**kw):
    base = dict(
        defocus_u_a=15000.0,
        defocus_v_a=15000.0,
        defocus_angle_deg=0.0,
        voltage_kv=300.0,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
    )
    base.update(kw)
    return CtfParameters.from_values(1, **base)


def at(ctf, sx, sy):
    return evaluate_ctf(
        ctf, torch.tensor([[sx]], dtype=torch.float64), torch.tensor([[sy]], dtype=torch.float64)
    )[0, 0].item()


def test_ctf_hand_computed_values():
    lam = 12.2643247 / math.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    # one general point, by hand from RELION's formula
    du, dv, ang, cs, q0, sx, sy = 20000.0, 18000.0, 30.0, 2.7e7, 0.07, 0.03, -0.02
    s2 = sx * sx + sy * sy
    defocus = -(du + dv) / 2 - (du - dv) / 2 * math.cos(
        2 * (math.atan2(sy, sx) - math.radians(ang))
    )
    gamma = (
        math.pi * lam * defocus * s2
        + math.pi / 2 * cs * lam**3 * s2 * s2
        - math.atan(q0 / math.sqrt(1 - q0 * q0))
    )
    expected = -math.sin(gamma)
    ctf = ctf_params(defocus_u_a=du, defocus_v_a=dv, defocus_angle_deg=ang, amplitude_contrast=q0)
    assert at(ctf, sx, sy) == pytest.approx(expected, abs=1e-12)
    # amplitude contrast alone at s = 0; a 90 degree phase plate gives 1
    assert at(ctf, 0.0, 0.0) == pytest.approx(q0, abs=1e-12)
    assert at(ctf_params(amplitude_contrast=0.0, phase_shift_deg=90.0), 0.0, 0.0) == pytest.approx(
        1.0, abs=1e-12
    )


def test_ctf_zeros_follow_defocus_and_astigmatism():
    lam = electron_wavelength_a(300.0).item()
    du, dv = 20000.0, 12000.0
    ctf = ctf_params(
        defocus_u_a=du,
        defocus_v_a=dv,
        defocus_angle_deg=0.0,
        spherical_aberration_mm=0.0,
        amplitude_contrast=0.0,
    )
    # with Cs = 0 and Q0 = 0 the first zero is at s^2 = 1 / (lambda * defocus) along each axis
    assert abs(at(ctf, math.sqrt(1 / (lam * du)), 0.0)) < 1e-9  # U along the angle (x)
    assert abs(at(ctf, 0.0, math.sqrt(1 / (lam * dv)))) < 1e-9  # V perpendicular (y)
    rotated = ctf_params(
        defocus_u_a=du,
        defocus_v_a=dv,
        defocus_angle_deg=90.0,
        spherical_aberration_mm=0.0,
        amplitude_contrast=0.0,
    )
    assert abs(at(rotated, 0.0, math.sqrt(1 / (lam * du)))) < 1e-9
    # underfocus gives positive contrast at low frequency (protein white)
    assert at(ctf, 0.002, 0.0) > 0


def test_ctf_bfactor_envelope_and_batch_shapes():
    ctf = ctf_params(bfactor_a2=100.0)
    plain = ctf_params()
    s = 0.05
    assert at(ctf, s, 0) == pytest.approx(at(plain, s, 0) * math.exp(-100 * s * s / 4), rel=1e-12)
    many = CtfParameters.concatenate([plain, ctf, plain])
    fx = torch.rand(1, 4, 5, generator=gen, dtype=torch.float64) * 0.1
    out = evaluate_ctf(many, fx, fx * 0.5)
    assert out.shape == (3, 4, 5)
    assert torch.allclose(out[0], out[2])


# -------------------------------------------------------------------------------- shifts
def test_integer_shift_is_a_roll_and_phases_match():
    n = 16
    img = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    shifts = torch.tensor([[3.0, -2.0], [0.0, 5.0]], dtype=torch.float64)
    moved = shift_images(img, shifts)
    assert torch.allclose(moved[0], torch.roll(img[0], shifts=(-2, 3), dims=(0, 1)))
    assert torch.allclose(moved[1], torch.roll(img[1], shifts=(5, 0), dims=(0, 1)))
    coeffs = half_plane_coefficients(n, 6.0)
    rows, cols = coeffs.rfft_indices()
    phases = shift_phases(coeffs.kx, coeffs.ky, shifts, n)  # (T, M)
    assert torch.allclose(rfft2c(moved)[:, rows, cols], rfft2c(img)[:, rows, cols] * phases)


# ------------------------------------------------------------------- in-plane resampling
def test_hermitian_extension_equals_full_transform_block():
    n = 16
    img = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    layout = SpectrumLayout(n, 5.0, 1)
    full = hermitian_extend(PrunedDft.create(layout, dtype=torch.float64).images(img))
    c = n // 2
    assert torch.allclose(full, fft2c(img)[:, c - 5 : c + 6, c - 5 : c + 6])


@pytest.mark.parametrize("oversampling,tolerance", [(2, 0.03), (3, 0.01)])
def test_cubic_inplane_sampling_against_exact_dtft(oversampling, tolerance):
    n, radius = 48, 8.0
    y, x = fft2_grid(n)
    img = torch.exp(-((x - 4) ** 2 + (y + 3) ** 2) / 50) + 0.2 * torch.randn(
        n, n, generator=gen, dtype=torch.float64
    )
    layout = SpectrumLayout(n, radius + 2.5 / oversampling + 1e-6, oversampling)
    block = hermitian_extend(PrunedDft.create(layout, dtype=torch.float64).images(img[None]))
    coeffs = half_plane_coefficients(n, radius)
    angles = torch.tensor([0.0, 0.4, 2.0, 4.4], dtype=torch.float64)
    qx, qy = inplane_sample_points(coeffs.kx, coeffs.ky, angles)
    matrix = cubic_interpolation_matrix(qx, qy, layout.half_width, oversampling)
    values = sample_blocks(block, matrix, tuple(qx.shape))[0]
    # exact DTFT at every rotated point: F_y(q_y) img F_x(q_x)^T
    fy = dft_matrix(qy.reshape(-1), n)
    fx = dft_matrix(qx.reshape(-1), n)
    exact = ((fy @ img.to(torch.complex128)) * fx).sum(-1).reshape(qx.shape)
    assert torch.allclose(values[0], exact[0], atol=1e-12)  # angle 0 reads grid points
    error = (values - exact).abs().norm(dim=-1) / exact.abs().norm(dim=-1)
    assert error.max() < tolerance


def test_ctf_grid_matches_pointwise_formula():
    from cryostoch.operators.ctf import CtfGrid

    fx = (torch.rand(3, 40, generator=gen, dtype=torch.float64) - 0.5) * 0.3
    fy = (torch.rand(3, 40, generator=gen, dtype=torch.float64) - 0.5) * 0.3
    n = 6
    ctf = CtfParameters.from_values(
        n,
        defocus_u_a=torch.linspace(8000, 30000, n, dtype=torch.float64),
        defocus_v_a=torch.linspace(7000, 29000, n, dtype=torch.float64),
        defocus_angle_deg=torch.linspace(-80, 170, n, dtype=torch.float64),
        voltage_kv=torch.tensor([300.0, 200, 300, 120, 300, 300], dtype=torch.float64),
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.07,
        phase_shift_deg=torch.linspace(0, 90, n, dtype=torch.float64),
        bfactor_a2=torch.linspace(0, 150, n, dtype=torch.float64),
    )
    reference = evaluate_ctf(ctf, fx[None], fy[None])
    assert torch.allclose(CtfGrid(fx, fy)(ctf), reference, atol=1e-10)
