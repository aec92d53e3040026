"""FSC, map transforms and map alignment (cryostoch.evaluate) and the `cryostoch fsc` command."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch

from cryostoch.evaluate import (
    FscResult,
    align_maps,
    apply_alignment,
    compute_fsc,
    fourier_shell_correlation,
    fsc_report,
    mirror_volume,
    rotate_volume,
    shell_counts,
    soft_sphere_mask,
)
from cryostoch.fourier import fft3c, ifft3c
from cryostoch.geometry import euler_to_matrix, random_rotations

# ---------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# ---------------------------------------------------------------------------------------------


def gaussian_blobs(n, centres, sigmas, weights, dtype=torch.float64):
    """Sum of isotropic Gaussians at `centres` (x, y, z) relative to the box centre n // 2."""
    k = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    v = torch.zeros(n, n, n, dtype=torch.float64)
    for c, s, w in zip(centres.tolist(), sigmas.tolist(), weights.tolist(), strict=True):
        v += w * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return v.to(dtype)


def numpy_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC over the full (not half) FFT, shells of rounded radius 0 .. N//2."""
    n = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(n, 1.0 / n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    r = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int).ravel()
    keep = r <= n // 2
    r = r[keep]

    def shell(v):
        return np.bincount(r, weights=v.ravel()[keep], minlength=n // 2 + 1)

    num = shell(np.real(fa * np.conj(fb)))
    return num / np.sqrt(shell(np.abs(fa) ** 2) * shell(np.abs(fb) ** 2))


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = (float((a * b).sum()) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


# asymmetric (chiral) arrangement of blobs of different sizes, box-64 units
BLOB_CENTRES = torch.tensor(
    [[0, 0, 0], [10, 2, -3], [-6, 9, 4], [3, -8, 10], [-9, -6, -7]], dtype=torch.float64
)
BLOB_SIGMAS = torch.tensor([5.0, 3.0, 2.5, 3.5, 2.5], dtype=torch.float64)
BLOB_WEIGHTS = torch.tensor([1.0, 1.5, 2.0, 1.2, 1.8], dtype=torch.float64)


def blob_map(n, centres=BLOB_CENTRES, dtype=torch.float32):
    scale = n / 64
    return gaussian_blobs(n, centres * scale, BLOB_SIGMAS * scale, BLOB_WEIGHTS, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# FSC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 17])
def test_fsc_matches_a_full_fft_computation(n):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    b = a + torch.randn(n, n, n, generator=g, dtype=torch.float64)
    shells, fsc = fourier_shell_correlation(a, b)
    assert shells.tolist() == list(range(n // 2 + 1))
    np.testing.assert_allclose(fsc.numpy(), numpy_fsc(a.numpy(), b.numpy()), atol=1e-12)
    # the half-space multiplicities count every full-space coefficient once
    k = np.fft.fftfreq(n, 1.0 / n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    r = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int).ravel()
    expected = np.bincount(r[r <= n // 2], minlength=n // 2 + 1)
    assert shell_counts(n).tolist() == expected.tolist()


@pytest.mark.parametrize("n", [24, 25])
def test_fsc_of_a_map_with_itself_is_one(n):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(n, n, n, generator=g)
    _, fsc = fourier_shell_correlation(a, a)
    assert torch.allclose(fsc, torch.ones_like(fsc), atol=1e-10)
    mask = soft_sphere_mask(n, n / 3, edge_px=3)
    _, fsc = fourier_shell_correlation(a, a.clone(), mask=mask)
    assert torch.allclose(fsc, torch.ones_like(fsc), atol=1e-10)


def test_fsc_of_independent_noise_maps_is_near_zero():
    n = 48
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    _, fsc = fourier_shell_correlation(a, b)
    counts = shell_counts(n).double()
    assert (fsc[1:].abs() < 4 / counts[1:].sqrt()).all()
    # and the spread is what independent coefficients give (counts/2 independent pairs)
    z = fsc[1:] * (counts[1:] / 2).sqrt()
    assert 0.6 < float(z.square().mean().sqrt()) < 1.4


def test_fsc_of_signal_plus_noise_follows_the_snr_per_shell():
    n = 48
    g = torch.Generator().manual_seed(6)
    # signal with a known power spectrum: white noise shaped by an amplitude a(k)
    k = (torch.arange(n, dtype=torch.float64) - n // 2)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    radius = torch.sqrt(kx**2 + ky**2 + kz**2)
    amplitude = 3.0 * torch.exp(-radius / 8.0)
    signal = ifft3c(fft3c(torch.randn(n, n, n, generator=g, dtype=torch.float64)) * amplitude).real
    noise_sigma = 1.0
    half_1 = signal + noise_sigma * torch.randn(n, n, n, generator=g, dtype=torch.float64)
    half_2 = signal + noise_sigma * torch.randn(n, n, n, generator=g, dtype=torch.float64)
    shells = torch.arange(n // 2 + 1, dtype=torch.float64)
    s = (3.0 * torch.exp(-shells / 8.0)) ** 2  # E |signal_hat|^2 per shell (unitary FFT)
    noise = noise_sigma**2  # E |noise_hat|^2
    counts = shell_counts(n).double()
    tol = 4 / counts.sqrt() + 0.02
    _, fsc_halves = fourier_shell_correlation(half_1, half_2)
    expected = s / (s + noise)
    assert ((fsc_halves - expected)[2:].abs() < tol[2:]).all()
    _, fsc_clean = fourier_shell_correlation(signal, half_1)
    expected = torch.sqrt(s / (s + noise))
    assert ((fsc_clean - expected)[2:].abs() < tol[2:]).all()
    # the 0.143 crossing of the half-map FSC is near the analytic one
    result = compute_fsc(half_1, half_2, pixel_size_a=1.5)
    k_143 = 8.0 * math.log(3.0 / math.sqrt(noise * 0.143 / 0.857))  # s/(s+n) = 0.143
    assert result.resolution_0143 == pytest.approx(n * 1.5 / k_143, rel=0.1)


def test_resolution_interpolates_the_first_crossing():
    # shells 0..8 of a box 16 at 2 A/px: frequency k / 32 1/A
    curve = torch.tensor([1.0, 0.99, 0.9, 0.7, 0.3, 0.6, 0.1, 0.05, 0.0])
    result = FscResult.from_curve(curve, 16, 2.0)
    assert torch.allclose(result.frequency_per_a, torch.arange(9.0, dtype=torch.float64) / 32)
    # 0.5 is crossed between shells 3 (0.7) and 4 (0.3): k = 3.5; the later rise is ignored
    assert result.resolution_05 == pytest.approx(32 / 3.5)
    # 0.143 between shells 5 (0.6) and 6 (0.1): k = 5 + 0.457 / 0.5
    assert result.resolution_0143 == pytest.approx(32 / (5 + 0.457 / 0.5))
    assert result.crosses(0.143)
    never = FscResult.from_curve(torch.full((9,), 0.95), 16, 2.0)
    assert not never.crosses(0.5)
    assert never.resolution_at(0.5) == pytest.approx(4.0)  # Nyquist
    assert "Nyquist" in never.describe_resolution(0.5)
    # a curve already below the threshold at shell 1 interpolates from shell 0 (taken as 1)
    low = FscResult.from_curve(torch.tensor([0.2, 0.0, 0.0]), 4, 1.0)
    assert low.resolution_at(0.5) == pytest.approx(4 / 0.5)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [31, 32])
def test_rotation_by_90_degrees_about_z_is_rot90(n):
    g = torch.Generator().manual_seed(7)
    v = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    a = euler_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64))  # passive Rz(90)
    # V'(x, y, z) = V(A^T (x, y, z)) = V(-y, x, z): V'[z, y, x] = V[z, x, -y]
    expected = torch.rot90(v, 1, dims=(1, 2))
    if n % 2 == 0:  # rot90 reverses about (N-1)/2; the centre is N/2: one plane further
        expected = torch.roll(expected, 1, dims=1)
        v_out = rotate_volume(v, a)[:, 1:, 1:]
        expected = expected[:, 1:, 1:]
    else:
        v_out = rotate_volume(v, a)
    assert torch.allclose(v_out, expected, atol=1e-10)


def test_rotation_then_inverse_rotation_returns_the_map():
    n = 40
    # smooth: blobs of sigma 2.5 .. 5 px (trilinear interpolation smooths finer detail)
    v = gaussian_blobs(n, BLOB_CENTRES * 0.6, BLOB_SIGMAS, BLOB_WEIGHTS)
    g = torch.Generator().manual_seed(8)
    a = random_rotations(1, g)[0]
    back = rotate_volume(rotate_volume(v, a), a.T)
    assert float((back - v).norm() / v.norm()) < 0.04
    back2 = rotate_volume(rotate_volume(v, a, oversampling=2), a.T, oversampling=2)
    assert float((back2 - v).norm() / v.norm()) < 0.01
    # shifts are undone too: V(A^T(x - s)) then rotate by A^T with shift -A^T s
    s = torch.tensor([2.5, -1.0, 3.0], dtype=torch.float64)
    moved = rotate_volume(v, a, s, oversampling=2)
    back3 = rotate_volume(moved, a.T, -(a.T @ s), oversampling=2)
    assert float((back3 - v).norm() / v.norm()) < 0.01
    # a batch of matrices gives the same as one at a time
    mats = random_rotations(3, g)
    batch = rotate_volume(v, mats)
    for i in range(3):
        assert torch.allclose(batch[i], rotate_volume(v, mats[i]))


def test_projection_of_rotated_map_is_the_relion_projection():
    n, sigma = 48, 2.5
    centre = torch.tensor([7.0, -4.0, 5.0], dtype=torch.float64)  # (x, y, z)
    v = gaussian_blobs(n, centre[None], torch.tensor([sigma]), torch.tensor([1.0]))
    shift = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    for euler in ([30.0, 60.0, -45.0], [-120.0, 150.0, 80.0]):
        a = euler_to_matrix(torch.tensor(euler, dtype=torch.float64))
        image = rotate_volume(v, a, shift, oversampling=2).sum(dim=0)  # integrate along z
        # RELION: img(x, y) = integral V(A^T (x, y, z)) dz, a Gaussian at (A c)_xy, + shift
        target = a @ centre + shift
        k = torch.arange(n, dtype=torch.float64) - n // 2
        y, x = torch.meshgrid(k, k, indexing="ij")
        expected = math.sqrt(2 * math.pi) * sigma * torch.exp(
            -((x - target[0]) ** 2 + (y - target[1]) ** 2) / (2 * sigma**2)
        )
        assert float((image - expected).abs().max()) < 0.01 * float(expected.max())


def test_mirror_reverses_z_about_the_centre():
    for n in (16, 17):
        centre = torch.tensor([[3.0, -2.0, 4.0]])
        v = gaussian_blobs(n, centre, torch.tensor([1.5]), torch.tensor([1.0]))
        flipped = gaussian_blobs(n, centre * torch.tensor([1.0, 1.0, -1.0]), torch.tensor([1.5]),
                                 torch.tensor([1.0]))
        # (for even n the plane z = -n/2 has no mirror image in the box and maps onto itself)
        start = 1 if n % 2 == 0 else 0
        assert torch.allclose(mirror_volume(v)[start:], flipped[start:], atol=1e-12)
        assert torch.equal(mirror_volume(v)[0], v[0]) or n % 2 == 1
        assert torch.equal(mirror_volume(mirror_volume(v)), v)


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "mirrored"), [(11, False), (12, True)])
def test_alignment_recovers_rotation_shift_and_hand(seed, mirrored):
    n = 48
    reference = blob_map(n)
    g = torch.Generator().manual_seed(seed)
    q = random_rotations(1, g)[0]
    t = torch.tensor([3.0, -2.0, 2.5], dtype=torch.float64)
    # moving map: each blob at q c + t (exact Gaussians), then z reversed if mirrored
    centres = BLOB_CENTRES * (n / 64) @ q.T + t
    if mirrored:
        centres = centres * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    moving = gaussian_blobs(n, centres, BLOB_SIGMAS * (n / 64), BLOB_WEIGHTS).float()

    alignment = align_maps(reference, moving, pixel_size_a=2.0)

    assert alignment.mirrored is mirrored
    # aligned(x) = M'(R^T (x - s)) = reference(x) when R = q^T, s = -q^T t
    assert rotation_angle_deg(alignment.rotation, q.T) < 5.0
    assert float((alignment.shift_px - (-(q.T @ t))).norm()) < 1.0
    assert alignment.correlation > 0.95
    aligned = apply_alignment(moving, alignment)
    fsc = compute_fsc(reference, aligned, pixel_size_a=2.0)
    # the blobs (sigma >= 1.9 px) carry signal out to about 0.12 cycles per pixel
    assert float(fsc.fsc[1 : int(0.12 * n) + 1].min()) > 0.9


# ---------------------------------------------------------------------------------------------
# Report and command line
# ---------------------------------------------------------------------------------------------


def write_mrc(path, volume, voxel_size):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume.numpy(), dtype=np.float32))
        mrc.voxel_size = voxel_size


@pytest.fixture
def fsc_command(monkeypatch):
    import cryostoch.cli.main as cli_main

    monkeypatch.setitem(cli_main.SUBCOMMANDS, "fsc", "fsc")
    return cli_main.main


def test_fsc_report_from_python(tmp_path):
    n = 32
    g = torch.Generator().manual_seed(13)
    a = blob_map(n)
    b = a + 0.02 * torch.randn(n, n, n, generator=g)
    report = fsc_report(a, b, pixel_size_a=3.0, mask_radius_a=40.0, plot_path=tmp_path / "f.png")
    assert report.alignment is None
    assert report.fsc.box_size == n and report.fsc.pixel_size_a == 3.0
    assert "0.143" in report.text
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_cli_fsc_aligns_and_writes_outputs(tmp_path, fsc_command, capsys):
    n = 32
    g = torch.Generator().manual_seed(14)
    a = blob_map(n)
    q = euler_to_matrix(torch.tensor([40.0, 70.0, -20.0], dtype=torch.float64))
    b = rotate_volume(mirror_volume(a), q, torch.tensor([1.0, 2.0, -1.0]), oversampling=2)
    b = b + 0.01 * torch.randn(n, n, n, generator=g)
    pa, pb = tmp_path / "a.mrc", tmp_path / "b.mrc"
    write_mrc(pa, a, 2.5)
    write_mrc(pb, b, 2.5)
    png, aligned = tmp_path / "fsc.png", tmp_path / "aligned.mrc"
    code = fsc_command(["fsc", str(pa), str(pb), "--align", "--out", str(png),
                        "--aligned-out", str(aligned)])
    out = capsys.readouterr().out
    assert code == 0
    assert png.is_file() and png.stat().st_size > 1000
    assert "0.143" in out and "hand flipped: yes" in out
    with mrcfile.open(aligned) as mrc:
        data = torch.from_numpy(mrc.data.copy())
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
    fsc = compute_fsc(a, data, pixel_size_a=2.5)
    assert float(fsc.fsc[1:5].min()) > 0.9


def test_cli_fsc_rejects_mismatched_maps(tmp_path, fsc_command, capsys):
    pa, pb, pc = tmp_path / "a.mrc", tmp_path / "b.mrc", tmp_path / "c.mrc"
    g = torch.Generator().manual_seed(0)  # not zeros: an empty map is refused on its own
    write_mrc(pa, torch.rand(16, 16, 16, generator=g), 2.0)
    write_mrc(pb, torch.rand(20, 20, 20, generator=g), 2.0)
    write_mrc(pc, torch.rand(16, 16, 16, generator=g), 2.5)
    png = tmp_path / "fsc.png"
    assert fsc_command(["fsc", str(pa), str(pb), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cryostoch: error:")
    assert "a.mrc" in err and "b.mrc" in err
    assert not png.exists()
    assert fsc_command(["fsc", str(pa), str(pc)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.mrc" in err and "c.mrc" in err
    # an explicit pixel size overrides the headers
    assert fsc_command(["fsc", str(pa), str(pc), "--pixel-size-a", "2.0"]) == 0


def test_fsc_is_zero_in_shells_a_low_pass_emptied():
    """Beyond a hard low-pass only round-off is left: the FSC there is 0, not the correlation
    of rounding errors; inside the band, the correlation of two noisy copies (analytic
    expectation 1 / sqrt(1 + 0.25) = 0.894 for noise of a quarter of the signal's power)."""
    from cryostoch.fourier.resample import low_pass

    generator = torch.Generator().manual_seed(4)
    signal = torch.randn(32, 32, 32, generator=generator, dtype=torch.float64)
    noisy = signal + 0.5 * torch.randn(32, 32, 32, generator=generator, dtype=torch.float64)
    _, fsc = fourier_shell_correlation(low_pass(signal, 8.0, 3).float(),
                                       low_pass(noisy, 8.0, 3).float())
    assert torch.all(fsc[10:] == 0)
    assert float(fsc[2:8].mean()) == pytest.approx(1 / math.sqrt(1.25), abs=0.03)
