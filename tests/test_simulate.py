"""`cryostoch simulate` / `random-init`: the forward model against closed-form real-space
projections of Gaussian blobs (independent) and against the likelihood (consistency), the SNR,
the files (read back by starfile, mrcfile and open_particles), bounded memory, the phantom's
asymmetry and one-line errors for bad input."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
import torch.nn.functional as F

import cryostoch.cli.main as cli_main
from cryostoch.fourier import rfft2c
from cryostoch.fourier.grids import fft3_grid, rfft2_grid
from cryostoch.fourier.transforms import irfft2c
from cryostoch.io import open_particles, write_map
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.operators import evaluate_ctf, extract_slices, shift_phases
from cryostoch.simulate import (
    CtfTable,
    DefaultCtf,
    ProjectionModel,
    SimulationConfig,
    draw_particle_parameters,
    load_source_volume,
    noise_seeds,
    particle_noise,
    phantom_radius_a,
    phantom_volume,
    random_spheres_volume,
    simulate_dataset,
)
from cryostoch.simulate.volumes import exact_scale_size, map_radius_a

CTF_STAR = "ctf/empiar10049_ctf.star"
SPIKE = "structures/6vyb.pdb"
BOX, PIXEL = 48, 5.0  # the phantom (about 223 A with its soft edge) fits in 240 A


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a small shared machine, torch's two threads wait on each other
    at every elementwise op of the slice stencil (up to 40 times slower when the other core is
    busy); results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(monkeypatch):
    """`cryostoch.cli.main.main` with the two new subcommands registered."""
    monkeypatch.setitem(cli_main.SUBCOMMANDS, "simulate", "simulate")
    monkeypatch.setitem(cli_main.SUBCOMMANDS, "random-init", "random_init")
    return cli_main.main


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# -- the phantom ------------------------------------------------------------------------------
def test_phantom_is_asymmetric_and_chiral():
    n, pixel = 64, 3.5
    v = phantom_volume(n, pixel)

    def flip(x: torch.Tensor, dim: int) -> torch.Tensor:  # mirror about the centre pixel N//2
        return torch.roll(torch.flip(x, dims=(dim,)), 1, dims=dim)

    # mirror images and the rotation by 180 degrees about the long axis z, about the box centre
    assert correlation(v, flip(v, 2)) < 0.8
    assert correlation(v, flip(v, 1)) < 0.8
    assert correlation(v, flip(v, 0)) < 0.8
    assert correlation(v, flip(flip(v, 1), 2)) < 0.8

    # After aligning principal axes: the only candidate symmetries are the sign flips of the
    # principal axes about the centre of mass (det -1: mirror images, det +1: 2-fold axes).
    z, y, x = fft3_grid(n)
    points = torch.stack([x, y, z], -1).reshape(-1, 3)
    w = v.reshape(-1)
    centre = (w[:, None] * points).sum(0) / w.sum()
    d = points - centre
    inertia = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()
    moments, axes = torch.linalg.eigh(inertia)
    assert moments[2] > 5 * moments[1]  # elongated
    for signs in itertools.product((1.0, -1.0), repeat=3):
        if signs == (1.0, 1.0, 1.0):
            continue
        t = axes @ torch.diag(torch.tensor(signs, dtype=torch.float64)) @ axes.T
        source = centre + d @ t.T  # sample V at the transformed point
        grid = ((source + n // 2) / (n - 1) * 2 - 1).reshape(1, n, n, n, 3)
        moved = F.grid_sample(v[None, None], grid, align_corners=True)[0, 0]
        assert correlation(v, moved) < 0.85, signs


def test_phantom_is_defined_in_angstrom():
    """The same molecule at any sampling: box 96 at 2.5 A Fourier-cropped to 48 at 5 A."""
    from cryostoch.fourier import resample_volume

    fine = resample_volume(phantom_volume(96, 2.5), 48)
    coarse = phantom_volume(48, 5.0)
    assert correlation(fine, coarse) > 0.98
    # the bounding sphere holds it: nothing beyond phantom_radius_a
    z, y, x = fft3_grid(48)
    r = torch.sqrt(x * x + y * y + z * z) * 5.0
    assert float(coarse[r > phantom_radius_a(5.0)].abs().max()) < 0.03 * float(coarse.max())


# -- the forward model ------------------------------------------------------------------------
def test_noise_free_images_are_the_likelihood_model(shared_data):
    """Consistency, not correctness: the simulator and the likelihood describe the same
    forward model. rfft2c of the noise-free images at the likelihood's coefficients equals
    sqrt(N) * extract_slices(model.volume_side.block(V)) * CTF * shift phase, in float64 (the
    simulator's own Nyquist-sized block against the likelihood's pruned block, its CtfGrid
    against evaluate_ctf, its rfft layout against the likelihood's coefficient indices). Both
    sides use the same slice and shift operators, so a convention error shared by them passes
    here; `test_projections_of_gaussian_blobs_match_real_space_formula` checks those
    conventions against closed-form real-space projections."""
    volume = phantom_volume(BOX, PIXEL)
    params = draw_particle_parameters(
        6, CtfTable.read(shared_data / CTF_STAR), seed=11, shift_sigma_px=1.5
    )
    assert float(params.shifts_px.abs().max()) > 0.5
    images = ProjectionModel(volume, PIXEL).particle_images(params)
    assert images.dtype == torch.float64

    model = MarginalLikelihood(LikelihoodConfig(BOX, PIXEL, max_radius_px=BOX / 2 - 3),
                               dtype=torch.float64)
    c = model.coefficients
    expected = math.sqrt(BOX) * extract_slices(
        model.volume_side.block(volume), params.rotations, c.kx, c.ky,
        model.config.volume_oversampling,
    )
    scale = 1.0 / (BOX * PIXEL)
    expected = expected * evaluate_ctf(params.ctf, (c.kx * scale)[None], (c.ky * scale)[None])
    expected = expected * shift_phases(c.kx, c.ky, params.shifts_px, BOX)
    rows, cols = c.rfft_indices()
    got = rfft2c(images)[:, rows, cols]
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_projection_conventions():
    """Independent of the slice machinery: at the identity rotation the image is the sum of the
    voxels along z (band-limited to the Nyquist disc), and a shift t moves it by +t pixels."""
    n = BOX
    volume = phantom_volume(n, PIXEL)
    model = ProjectionModel(volume, PIXEL)
    eye = torch.eye(3, dtype=torch.float64)[None]
    image = model.images(eye)[0]
    ky, kx = rfft2_grid(n)
    disc = kx * kx + ky * ky <= (n / 2) ** 2
    reference = irfft2c(rfft2c(volume.sum(0)) * disc, n)
    assert torch.allclose(image, reference, atol=1e-10 * float(reference.abs().max()))
    shifted = model.images(eye, None, torch.tensor([[3.0, -2.0]], dtype=torch.float64))[0]
    assert torch.allclose(shifted, torch.roll(image, shifts=(-2, 3), dims=(0, 1)), atol=1e-10)


# Gaussian blobs (centre c in voxels relative to the box centre, width s voxels, amplitude a):
# with well separated, smooth blobs their projections are known in closed form.
BLOBS = (((3.0, -2.0, 1.0), 1.8, 1.0), ((-4.0, 1.0, -2.0), 2.0, 0.7), ((0.5, 4.0, 3.0), 1.6, 1.3))


def _blob_volume(n: int) -> torch.Tensor:
    z, y, x = fft3_grid(n)
    volume = torch.zeros(n, n, n, dtype=torch.float64)
    for (cx, cy, cz), s, a in BLOBS:
        volume += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))
    return volume


def _analytic_blob_images(n: int, rotations: np.ndarray, shifts: np.ndarray,
                          apodisation_period: float | None) -> torch.Tensor:
    """Real-space projections of BLOBS, in closed form: img(x, y) = integral V(A^T u) dz with
    u = (x, y, z) (docs/conventions.md). V(A^T u) peaks where A^T u = c, i.e. at u = A c, and a
    3-D Gaussian of width s integrates along z to sqrt(2 pi) s a exp(-|(x,y) - (A c)_xy|^2 / 2s^2).
    The shift t moves it to (A c)_xy + t; pixel (row y, column x) sits at (x, y) - N//2.

    apodisation_period: trilinear interpolation of a spectrum sampled every 1/L cycles per voxel
    multiplies the volume by sinc^2(x / L) sinc^2(y / L) sinc^2(z / L) (the Fourier transform of
    the triangle kernel); for blobs much narrower than L this scales blob c by
    prod_i sinc^2(c_i / L). L = oversampling * N for the simulator's block."""
    y, x = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    out = np.zeros((len(rotations), n, n))
    for (cx, cy, cz), s, a in BLOBS:
        c = np.array([cx, cy, cz])
        factor = 1.0
        if apodisation_period is not None:
            factor = float(np.prod(np.sinc(c / apodisation_period) ** 2))
        for j, (a_mat, t) in enumerate(zip(rotations, shifts, strict=True)):
            px, py, _ = a_mat @ c
            px, py = px + t[0], py + t[1]
            out[j] += factor * a * math.sqrt(2 * math.pi) * s * np.exp(
                -((x - px) ** 2 + (y - py) ** 2) / (2 * s * s))
    return torch.from_numpy(out)


@pytest.mark.parametrize(("oversampling", "tolerance"), [(2, 0.02), (4, 0.005)])
def test_projections_of_gaussian_blobs_match_real_space_formula(oversampling, tolerance):
    """Independent of the slice machinery: noise-free, CTF-free images of a volume of Gaussian
    blobs at non-identity poses and non-zero shifts against their analytic real-space
    projections, with RELION's matrices written out here (`_relion_matrix`). Tolerance: what
    is left of trilinear interpolation after the apodisation correction (about 1.4% of the peak
    at oversampling 2, 0.3% at 4); a transposed rotation or a flipped or swapped shift is off by
    80-100% of the peak."""
    n, pixel = 24, 2.0
    euler = [(37.0, 61.0, -113.0), (200.0, 20.0, 45.0), (-75.0, 128.0, 10.0)]
    rotations = np.stack([_relion_matrix(*e) for e in euler])
    shifts = np.array([[1.5, -0.75], [-2.0, 1.0], [0.3, 2.2]])
    model = ProjectionModel(_blob_volume(n), pixel, oversampling=oversampling)
    images = model.images(torch.from_numpy(rotations), None, torch.from_numpy(shifts))
    reference = _analytic_blob_images(n, rotations, shifts, oversampling * n)
    peak = float(reference.abs().max())
    assert float((images - reference).abs().max()) < tolerance * peak
    # the checks that this comparison can tell conventions apart
    for wrong_rotations, wrong_shifts in ((rotations.transpose(0, 2, 1), shifts),
                                          (rotations, -shifts), (rotations, shifts[:, ::-1])):
        wrong = _analytic_blob_images(n, wrong_rotations, wrong_shifts, oversampling * n)
        assert float((images - wrong).abs().max()) > 0.3 * peak


def test_noise_is_per_particle_and_white():
    seeds = noise_seeds(5, 40)
    assert np.array_equal(noise_seeds(5, 10), seeds[:10])
    a = particle_noise(seeds, 32)
    assert torch.equal(particle_noise(seeds[7:9], 32), a[7:9])
    assert abs(float(a.var()) - 1) < 0.02 and abs(float(a.mean())) < 0.02
    # white: the same power (1, unitary DFT) in every frequency band
    power = rfft2c(a.double()).abs().pow(2).mean(0)
    ky, kx = rfft2_grid(32)
    radius = torch.sqrt(kx * kx + ky * ky)
    for lo, hi in ((0, 4), (4, 8), (8, 12), (12, 16)):
        band = (radius >= lo) & (radius < hi) & (kx > 0)
        assert abs(float(power[band].mean()) - 1) < 0.08, (lo, hi)


# -- a whole data set on disk -----------------------------------------------------------------
def simulate_files(cli, shared_data, out: Path, *extra: str, n: int = 300) -> int:
    return cli([
        "simulate", "--volume", "phantom", "--n-particles", str(n), "--box", str(BOX),
        "--pixel-size-a", str(PIXEL), "--out", str(out), "--ctf-table",
        str(shared_data / CTF_STAR), "--shift-sigma-a", "1.0", "--seed", "7", "--quiet",
        "--chunk-size", "64", *extra,
    ])


def test_simulated_files_read_back(cli, shared_data, tmp_path, capsys):
    out = tmp_path / "sim"
    n = 300
    assert simulate_files(cli, shared_data, out, n=n) == 0
    capsys.readouterr()

    # starfile: RELION 3.1 tables
    star = starfile.read(out / "particles.star", always_dict=True)
    optics, particles = star["optics"], star["particles"]
    assert list(optics.columns) == [
        "rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
        "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
    ]
    assert optics.iloc[0]["rlnVoltage"] == 300 and optics.iloc[0]["rlnSphericalAberration"] == 2
    assert optics.iloc[0]["rlnImageSize"] == BOX and optics.iloc[0]["rlnImagePixelSize"] == PIXEL
    assert len(particles) == n
    assert particles["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert particles["rlnImageName"].iloc[-1] == f"{n:06d}@particles.mrcs"
    assert (particles["rlnCtfBfactor"] == 0).all()
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift",
                   "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                   "rlnOriginYAngst", "rlnOpticsGroup"):
        assert column in particles.columns

    # mrcfile: the stack and the ground truth
    with mrcfile.open(out / "particles.mrcs", permissive=False) as mrc:
        stack = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
        assert mrc.data.dtype == np.float32 and int(mrc.header.ispg) == 0
        assert math.isclose(float(mrc.voxel_size.x), PIXEL, rel_tol=1e-6)
    assert stack.shape == (n, BOX, BOX)
    with mrcfile.open(out / "ground_truth.mrc", permissive=False) as mrc:
        truth = torch.from_numpy(np.array(mrc.data, dtype=np.float32))
        assert math.isclose(float(mrc.voxel_size.x), PIXEL, rel_tol=1e-6)
    summary = json.loads((out / "simulation.json").read_text())
    assert torch.allclose(truth.double(), summary["density_scale"] * phantom_volume(BOX, PIXEL),
                          rtol=1e-6, atol=1e-7)
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # open_particles: counts, geometry, CTFs and poses are the ones simulated
    expected = draw_particle_parameters(n, CtfTable.read(shared_data / CTF_STAR), seed=7,
                                        shift_sigma_px=1.0 / PIXEL)
    with open_particles(out / "particles.star") as data:
        assert len(data) == n and data.box_size == BOX and data.pixel_size_a == PIXEL
        assert data.has_images
        for field in ("defocus_u_a", "defocus_v_a", "defocus_angle_deg", "voltage_kv",
                      "spherical_aberration_mm", "amplitude_contrast", "phase_shift_deg"):
            assert torch.allclose(getattr(data.ctf, field), getattr(expected.ctf, field),
                                  rtol=1e-9, atol=1e-9), field
        poses = data.poses
        assert torch.allclose(poses.euler_deg, expected.euler_deg, atol=1e-6)
        assert torch.allclose(poses.shifts_px, expected.shifts_px, atol=1e-8)  # t = -origin
        assert float(expected.shifts_px.norm(dim=1).max()) <= 3.0 / PIXEL + 1e-12
        read_back = data.read_images(np.arange(n))
    assert torch.equal(read_back, stack)

    # The noise-free part is the model at the poses and CTFs in the STAR file, of the map in
    # ground_truth.mrc; what is left is white noise of sigma 1; the SNR is the requested one.
    noise = particle_noise(noise_seeds(7, n), BOX)
    clean = stack - noise
    model = ProjectionModel(truth.double(), PIXEL)
    predicted = model.images(
        torch.from_numpy(np.stack([_relion_matrix(*e) for e in poses.euler_deg.tolist()])),
        data.ctf, poses.shifts_px,
    )
    assert torch.allclose(clean.double(), predicted, rtol=0, atol=2e-5)
    signal = predicted.var(dim=(-2, -1), unbiased=False).mean()
    residual = (stack.double() - predicted).var(dim=(-2, -1), unbiased=False).mean()
    assert abs(float(residual) - 1) < 0.01
    realised = float(signal / residual)
    assert abs(realised / 0.05 - 1) < 0.05
    assert abs(summary["realised_snr"] / realised - 1) < 1e-3

    # cryostoch info describes it
    assert cli(["info", str(out / "particles.star")]) == 0
    text = capsys.readouterr().out
    for needle in ("Particles:          300", f"{BOX} px", f"{PIXEL:g} A", "300 kV", "Cs 2 mm",
                   "Poses:              present", "Usable:             yes"):
        assert needle in text, needle


def _relion_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix written out (docs/conventions.md), independent of geometry."""

    def rz(a):
        c, s = math.cos(a), math.sin(a)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])

    def ry(b):
        c, s = math.cos(b), math.sin(b)
        return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])

    return rz(math.radians(psi)) @ ry(math.radians(tilt)) @ rz(math.radians(rot))


def test_snr_from_small_pilot_and_independent_of_chunks(tmp_path):
    """A pilot of 300 particles sets the scale for 600 (the images' variance varies by about
    40% between particles, so the pilot's mean is within 2% of the whole set's); the output
    does not depend on the chunk size; float16 stacks hold the same images."""
    base = dict(source="phantom", n_particles=600, box_size=32, pixel_size_a=7.5, seed=3,
                pilot_size=300, n_montage=0)
    a = simulate_dataset(SimulationConfig(out_dir=str(tmp_path / "a"), chunk_size=64, **base),
                         progress=False)
    assert abs(a.realised_snr / 0.05 - 1) < 0.05
    b = simulate_dataset(SimulationConfig(out_dir=str(tmp_path / "b"), chunk_size=23,
                                          dtype="float16", **base), progress=False)
    with mrcfile.open(a.stack_path) as ma, mrcfile.open(b.stack_path) as mb:
        assert int(mb.header.mode) == 12
        assert np.allclose(np.asarray(mb.data, np.float32), ma.data, rtol=1e-3, atol=2e-3)
    assert not (tmp_path / "a" / "montage.png").exists()
    assert math.isclose(a.density_scale, b.density_scale, rel_tol=1e-6)  # float32 rounding


def test_default_ctf_and_snr_option(tmp_path):
    config = SimulationConfig(source="phantom", n_particles=50, box_size=32, pixel_size_a=7.5,
                              out_dir=str(tmp_path / "d"), snr=0.5, n_montage=2)
    result = simulate_dataset(config, progress=False)
    assert abs(result.realised_snr / 0.5 - 1) < 0.02
    particles = starfile.read(result.star_path, always_dict=True)
    optics = particles["optics"].iloc[0]
    assert (optics["rlnVoltage"], optics["rlnSphericalAberration"],
            optics["rlnAmplitudeContrast"]) == (300, 2.7, 0.1)
    defocus = particles["particles"]["rlnDefocusU"]
    assert defocus.between(10_000, 30_000).all()
    assert (particles["particles"]["rlnDefocusV"] == defocus).all()
    assert (particles["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]] == 0).all().all()
    sampler = DefaultCtf()
    assert sampler.optics[0].voltage_kv == 300


def test_failure_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import cryostoch.io.star as star

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(star, "write_particles_star", broken)
    out = tmp_path / "broken"
    config = SimulationConfig(source="phantom", n_particles=20, box_size=32, pixel_size_a=7.5,
                              out_dir=str(out))
    with pytest.raises(OSError, match="disk full"):
        simulate_dataset(config, progress=False)
    assert not out.exists()  # neither a file nor the folder the run created


# -- sources ----------------------------------------------------------------------------------
def test_atomic_model_density(shared_data):
    source = load_source_volume(shared_data / SPIKE, 64, 3.5)
    v = source.volume
    assert v.shape == (64, 64, 64) and "22,365 atoms" in source.description
    z, y, x = fft3_grid(64)
    mass = v.clamp(min=0)
    centre = [float((mass * g).sum() / mass.sum()) for g in (x, y, z)]
    assert max(abs(c) for c in centre) < 0.3  # centre of mass at pixel N // 2
    assert float(v.clamp(max=0).pow(2).sum() / v.pow(2).sum()) < 0.01  # essentially positive
    r = torch.sqrt(x * x + y * y + z * z) * 3.5
    significant = mass > 0.01 * float(mass.max())
    assert float(mass[(r > source.radius_a) & significant].sum()) < 1e-3 * float(mass.sum())


def test_mrc_map_is_rescaled(tmp_path):
    """A smooth map at 3.5 A / 64 px, rescaled to 5 A / 48 px and to 2.5 A / 96 px, matches the
    same analytic density sampled on the new grids."""
    blobs = [((10.0, -20.0, 5.0), 9.0, 1.0), ((-30.0, 15.0, -25.0), 12.0, 0.7),
             ((25.0, 30.0, 40.0), 10.0, 0.5)]

    def density(n: int, pixel: float) -> torch.Tensor:
        z, y, x = (g * pixel for g in fft3_grid(n))
        out = torch.zeros_like(x)
        for (cx, cy, cz), sigma, a in blobs:
            out += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
                                 / (2 * sigma**2))
        return out

    path = tmp_path / "map.mrc"
    write_map(path, density(64, 3.5), 3.5)
    for box, pixel in ((48, 5.0), (96, 2.5), (64, 3.5)):
        got = load_source_volume(path, box, pixel).volume
        expected = density(box, pixel)
        assert float((got - expected).abs().max()) < 2e-3, (box, pixel)
    assert exact_scale_size(64, 0.7) == (70, 49)
    assert map_radius_a(density(64, 3.5), 3.5) < 80


# -- random-init ------------------------------------------------------------------------------
def test_random_init(cli, tmp_path, capsys):
    out = tmp_path / "init.mrc"
    assert cli(["random-init", "--box", "40", "--pixel-size-a", "3", "--seed", "4",
                "--out", str(out), "--particle-diameter-a", "90"]) == 0
    with mrcfile.open(out, permissive=False) as mrc:
        volume = torch.from_numpy(np.array(mrc.data))
        assert math.isclose(float(mrc.voxel_size.x), 3.0, rel_tol=1e-6)
    expected = random_spheres_volume(40, 15.0, torch.Generator().manual_seed(4))
    assert torch.equal(volume, expected)
    assert cli(["random-init", "--box", "40", "--pixel-size-a", "3", "--seed", "5",
                "--out", str(tmp_path / "other.mrc")]) == 0
    with mrcfile.open(tmp_path / "other.mrc") as mrc:
        assert not np.array_equal(mrc.data, volume.numpy())
    capsys.readouterr()
    assert cli(["random-init", "--box", "40", "--pixel-size-a", "3", "--out", str(out),
                "--particle-diameter-a", "200"]) == 2
    assert "does not fit in the box of 40 x 3 = 120 A" in capsys.readouterr().err


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture
def empty_ctf_table(tmp_path) -> Path:
    path = tmp_path / "empty_ctf.star"
    path.write_text(textwrap.dedent("""\
        data_optics

        loop_
        _rlnOpticsGroupName #1
        _rlnOpticsGroup #2
        _rlnVoltage #3
        _rlnSphericalAberration #4
        _rlnAmplitudeContrast #5
        opticsGroup1 1 300.0 2.7 0.1

        data_particles

        loop_
        _rlnDefocusU #1
        _rlnDefocusV #2
        _rlnDefocusAngle #3
        _rlnOpticsGroup #4
        """))
    return path


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"--n-particles": "0"}, ["--n-particles", "positive integer"]),
        ({"--n-particles": "-5"}, ["--n-particles", "positive integer"]),
        ({"--snr": "0"}, ["--snr", "positive"]),
        ({"--snr": "-1"}, ["--snr", "positive"]),
        ({"--pixel-size-a": "0"}, ["--pixel-size-a", "positive"]),
        ({"--pixel-size-a": "-2"}, ["--pixel-size-a", "positive"]),
        ({"--box": "0"}, ["--box"]),
        ({"--chunk-size": "0"}, ["--chunk-size", "positive integer"]),
        ({"--shift-sigma-a": "-1"}, ["--shift-sigma-a"]),
        ({"--box": "32"}, ["--box", "phantom is 223 A across", "box is only 32 x 5 = 160 A"]),
        ({"--shift-sigma-a": "10"}, ["--box", "plus 30 A of shifts", "240 A"]),
        ({"--volume": "SPIKE", "--pixel-size-a": "3"},
         ["--box", "model is 198 A across", "22,365 atoms", "box is only 48 x 3 = 144 A"]),
        ({"--volume": "missing.pdb"}, ["missing.pdb", "no such file"]),
        ({"--volume": "GARBAGE"}, ["garbage.pdb"]),
        ({"--volume": "BROKEN"}, ["broken.cif", "not a readable PDB or mmCIF file"]),
        ({"--device": "bogus"}, ["--device", "unknown device"]),
        ({"--volume": "notes.txt"}, ["notes.txt", "unknown file type"]),
        ({"--ctf-table": "EMPTY"}, ["empty_ctf.star"]),
        ({"--ctf-table": "missing.star"}, ["missing.star", "no such file"]),
    ],
)
def test_bad_input_is_one_line(cli, shared_data, tmp_path, capsys, empty_ctf_table, change,
                               needles):
    (tmp_path / "garbage.pdb").write_text("this is not\x00 a PDB file\n" * 3)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "broken.cif").write_text('data_x\nloop_\n_atom_site.id\n"unterminated\n')
    substitutes = {"SPIKE": str(shared_data / SPIKE), "EMPTY": str(empty_ctf_table),
                   "GARBAGE": str(tmp_path / "garbage.pdb"),
                   "BROKEN": str(tmp_path / "broken.cif"),
                   "missing.pdb": str(tmp_path / "missing.pdb"),
                   "missing.star": str(tmp_path / "missing.star"),
                   "notes.txt": str(tmp_path / "notes.txt")}
    options = {"--volume": "phantom", "--n-particles": "10", "--box": str(BOX),
               "--pixel-size-a": str(PIXEL), "--out": str(tmp_path / "out"), "--quiet": None}
    options.update({k: substitutes.get(v, v) for k, v in change.items()})
    argv = ["simulate"]
    for key, value in options.items():
        argv += [key] if value is None else [key, value]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cryostoch: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out" / "particles.star").exists()
    assert not (tmp_path / "out" / "particles.mrcs").exists()


def test_existing_outputs_need_overwrite(cli, tmp_path, capsys):
    argv = ["simulate", "--volume", "phantom", "--n-particles", "8", "--box", "32",
            "--pixel-size-a", "7.5", "--out", str(tmp_path / "o"), "--quiet", "--montage", "0"]
    assert cli(argv) == 0
    capsys.readouterr()
    assert cli(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli([*argv, "--overwrite", "--seed", "1"]) == 0


# -- bounded memory ---------------------------------------------------------------------------
MEMORY_SCRIPT = """
import resource, sys
import torch
from cryostoch.simulate import SimulationConfig, simulate_dataset

torch.set_num_threads(1)

def run(n, name):
    simulate_dataset(SimulationConfig(source="phantom", n_particles=n, box_size=64,
                                      pixel_size_a=3.75, out_dir=sys.argv[1] + name,
                                      chunk_size=200, pilot_size=200, n_montage=0),
                     progress=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

small = run(200, "/small")
large = run(3000, "/large")
print(small, large)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_memory_stays_bounded(tmp_path):
    """3,000 images of 64 x 64 (a 49 MB stack) in chunks of 200 need no more memory than
    200 images: the peak RSS grows by far less than the stack."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=300, check=True)
    small, large = map(int, result.stdout.split())
    stack_kib = 3000 * 64 * 64 * 4 / 1024
    assert large - small < 0.2 * stack_kib, (small, large, stack_kib)
    assert (tmp_path / "large" / "particles.mrcs").stat().st_size > stack_kib * 1024
