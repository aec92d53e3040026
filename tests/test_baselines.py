"""Baselines (paper Fig. 6): closed-form maps from back-projection sums, projection matching,
batch EM, their engine and `cryostoch baseline`, on small simulated data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cryostoch.baselines import (
    Regulariser,
    backproject_sums,
    batch_em,
    closed_form_map,
    em_iteration,
    projection_matching,
    projection_matching_iteration,
    refine_map,
    shell_power,
    solve_map,
)
from cryostoch.evaluate.fsc import fourier_shell_correlation
from cryostoch.fourier import (
    PrunedDft,
    SpectrumLayout,
    fft2_grid,
    fft3_grid,
    ifft2c,
    low_pass,
    soft_low_pass,
)
from cryostoch.geometry.rotations import euler_to_matrix, random_rotations
from cryostoch.model.hard_assignment import hard_statistics
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.operators import CtfParameters, evaluate_ctf, extract_slices
from cryostoch.simulate.init import random_spheres_volume

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread avoids oversubscribing a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- simulation
def blobs(n: int, seed: int, count: int = 6) -> torch.Tensor:
    """A smooth positive test density: Gaussian blobs near the box centre."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = fft3_grid(n)
    vol = torch.zeros(n, n, n, dtype=F64)
    for _ in range(count):
        c = (torch.rand(3, generator=g, dtype=F64) - 0.5) * n * 0.3
        s = 1.5 + torch.rand(1, generator=g, dtype=F64).item() * n / 20
        vol += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def ctf_set(count: int, seed: int) -> CtfParameters:
    g = torch.Generator().manual_seed(seed)
    du = 10000 + 15000 * torch.rand(count, generator=g, dtype=F64)
    return CtfParameters.from_values(
        count, defocus_u_a=du, defocus_v_a=du - 300, defocus_angle_deg=30.0, voltage_kv=300.0,
        spherical_aberration_mm=2.7, amplitude_contrast=0.1,
    )


def simulate(volume, rotations, shifts_px, ctf, pixel_size_a, band, noise, seed):
    """Images band-limited to |k| <= band: the central slice (read from a 4x oversampled
    spectrum), CTF, shift by t (particle centre at N//2 + t), plus white noise."""
    n = volume.shape[-1]
    block = PrunedDft.create(SpectrumLayout(n, band + 1, 4), dtype=F64).volume(volume.to(F64))
    ky, kx = fft2_grid(n)
    inside = kx * kx + ky * ky <= band * band
    kxb, kyb = kx[inside], ky[inside]
    proj = extract_slices(block, rotations.to(F64), kxb, kyb, 4) * math.sqrt(n)
    c = evaluate_ctf(ctf, (kxb / (n * pixel_size_a))[None], (kyb / (n * pixel_size_a))[None])
    t = shifts_px.to(F64)
    phase = torch.polar(torch.ones_like(proj.real),
                        -2 * math.pi * (kxb * t[:, :1] + kyb * t[:, 1:]) / n)
    spectrum = torch.zeros(rotations.shape[0], n, n, dtype=torch.complex128)
    spectrum[:, inside] = proj * c * phase
    images = ifft2c(spectrum).real
    g = torch.Generator().manual_seed(seed)
    return images + noise * torch.randn(images.shape, generator=g, dtype=F64)


def simulate_at_poses(model, volume, pose_index, ctf, noise, seed):
    """Images at quadrature points of `model` (so the true poses are on its grid)."""
    euler, shifts = model.pose_parameters(pose_index)
    band = min(model.config.max_radius_px + 3, model.config.box_size / 2 - 1)
    return simulate(volume, euler_to_matrix(euler), shifts, ctf, model.config.pixel_size_a,
                    band, noise, seed)


def fsc_curve(a, b):
    return fourier_shell_correlation(a.double().cpu(), b.double().cpu())[1]


def make_model(n=24, radius=5.0, dtype=F64, shift_radius=0.0):
    return MarginalLikelihood(
        LikelihoodConfig(box_size=n, pixel_size_a=4.0, max_radius_px=radius,
                         shift_radius_px=shift_radius),
        dtype=dtype,
    )


# ------------------------------------------------------------------------ closed-form maps
def test_closed_form_map_from_exact_slices_recovers_truth():
    """Sums made of the model's own slices (C = 1 at every direction): the map is the truth."""
    n, r = 32, 6.0
    model = make_model(n, r)
    truth = blobs(n, 3) * 2
    slices = model.slices(truth)
    w = model.weights_k
    num, den = w * slices, w.expand_as(slices.real).clone()
    reference = low_pass(truth, r, 3)
    exact = closed_form_map(num, den, model, regulariser=Regulariser("none"), cutoff_px=r)
    gridded = closed_form_map(num, den, model, regulariser=Regulariser("none"), cutoff_px=r,
                              refine_iterations=0)
    shells = slice(1, int(r) + 1)
    assert fsc_curve(exact, reference)[shells].min() > 0.98
    assert fsc_curve(gridded, reference)[shells].min() > 0.95
    # the CG solve removes the blur of the gridding average
    assert (exact - reference).norm() < 0.06 * reference.norm()
    assert (exact - reference).norm() < 0.5 * (gridded - reference).norm()
    # the model sees the same slices again
    assert (model.slices(exact) - slices).norm() < 0.02 * slices.norm()


@pytest.mark.parametrize("shift_radius", [0.0, 1.5])
def test_closed_form_map_from_noise_free_images_at_true_poses(shift_radius):
    """hard_statistics of noise-free images (CTF, in-plane angles, shifts) at their true
    quadrature poses give back the truth, low-passed to the cutoff: FSC > 0.95 up to it."""
    n, r = 24, 5.0
    model = make_model(n, r, shift_radius=shift_radius)
    truth = blobs(n, 1)
    count = 1500
    pose = torch.randint(0, model.quadrature_size, (count,),
                         generator=torch.Generator().manual_seed(5))
    ctf = ctf_set(count, 6)
    images = simulate_at_poses(model, truth, pose, ctf, noise=0.0, seed=7)
    num, den = hard_statistics(model, model.image_blocks(images), ctf, pose)
    volume = closed_form_map(num, den, model, regulariser=Regulariser("none"), cutoff_px=r)
    fsc = fsc_curve(volume, low_pass(truth, r, 3))
    assert fsc[1 : int(r) + 1].min() > 0.95, fsc
    # and the soft statistics of a point-mass posterior are the same sums
    assert volume.dtype == model.dtype and volume.shape == (n, n, n)


def test_wiener_estimate_formula_and_regularisers():
    """One direction, one known coefficient: the gridded estimate is
    sqrt(N) num / (N den + 2 sigma^2 / tau^2) at the voxel it hits exactly."""
    from cryostoch.fourier import rfft3c

    n, r = 24, 5.0
    model = make_model(n, r)
    num = torch.zeros(model.n_directions, model.n_points, dtype=torch.complex128)
    den = torch.zeros(model.n_directions, model.n_points, dtype=F64)
    # a direction whose slice is the plane kz = 0 (A = identity): its points lie on the grid,
    # off the kx = 0 plane
    d = int(torch.nonzero(
        (model.direction_matrices - torch.eye(3, dtype=F64)).abs().amax((1, 2)) < 1e-9)[0])
    k = int(torch.nonzero((model.coefficients.kx == 2) & (model.coefficients.ky == 1))[0])
    num[d, k], den[d, k] = 2 * (3.0 + 1.0j), 2 * 0.5
    back = backproject_sums(num, den, model, oversampling=2)
    covered = back.denominator > 1e-9 * back.denominator.max()
    assert int(covered.sum()) == 1
    value_num, value_den = back.numerator[covered][0], back.denominator[covered][0]
    assert value_den.item() == pytest.approx(n * 2 * 0.5)
    assert value_num.item() == pytest.approx(math.sqrt(n) * 2 * (3.0 + 1.0j))
    assert back.radius[covered][0].item() == pytest.approx(math.sqrt(5.0))
    iz, iy, ix = torch.nonzero(covered)[0].tolist()
    c = n // 2
    at = (c + iz - back.k_max, c + iy - back.k_max, ix)
    for tau2 in (0.01, 1.0):
        vol = solve_map(back, tau2_per_shell=torch.full((10,), tau2, dtype=F64))
        expected = value_num / (value_den + 2.0 / tau2)
        assert rfft3c(vol)[at].item() == pytest.approx(expected.item(), rel=1e-9)
    unregularised = solve_map(back)
    assert rfft3c(unregularised)[at].item() == pytest.approx((value_num / value_den).item())
    assert Regulariser.parse("map", 2.0).describe().startswith("per-shell")
    assert Regulariser.parse("0.5").tau2 == 0.5
    assert Regulariser.parse("none").tau2_per_shell(None, 4) is None
    for bad in ("-1", "abc", "inf", "0", "shell"):
        with pytest.raises(ValueError):
            Regulariser.parse(bad)
    with pytest.raises(ValueError):
        backproject_sums(num[:, :3], den, model)
    power = shell_power(blobs(n, 2))
    assert power.shape == (n // 2 + 1,) and bool((power[:6] > 0).all())


def test_refine_map_minimises_the_m_step_objective():
    """The default 10 CG steps reach the minimum of the M-step objective Q (the expected
    complete-data negative log posterior) far more closely than the gridded estimate."""
    from cryostoch.fourier import rfft3c

    n, r = 24, 5.0
    model = make_model(n, r)
    truth = blobs(n, 4)
    count = 400
    pose = torch.randint(0, model.quadrature_size, (count,),
                         generator=torch.Generator().manual_seed(8))
    ctf = ctf_set(count, 9)
    images = simulate_at_poses(model, truth, pose, ctf, noise=1.0, seed=10)
    num, den = hard_statistics(model, model.image_blocks(images), ctf, pose)
    back = backproject_sums(num, den, model)
    tau2 = Regulariser().tau2_per_shell(truth, back.k_max + 2)
    gridded = solve_map(back, tau2_per_shell=tau2)
    k, c = back.k_max, n // 2
    t = tau2[back.radius.round().long().clamp(max=tau2.shape[0] - 1)]
    twins = torch.where(torch.arange(k + 1) > 0, 2.0, 1.0).to(F64)

    def objective(v) -> float:
        s = model.slices(v)
        data = 0.5 * (den * s.abs() ** 2 - 2 * (num.conj() * s).real).sum()
        part = rfft3c(v)[c - k : c + k + 1, c - k : c + k + 1, : k + 1]
        prior = 0.5 * (twins * part.abs() ** 2 / t).sum()
        return float(data + prior)

    def solved(steps):
        return refine_map(gridded, num, den, model, back, tau2_per_shell=tau2,
                          iterations=steps, tolerance=1e-12)

    q_grid, q_10, q_best = objective(gridded), objective(solved(10)), objective(solved(60))
    assert q_best <= q_10 + 1e-9 * abs(q_best) and q_10 < q_grid
    assert q_10 - q_best < 0.02 * (q_grid - q_best)


# ----------------------------------------------------------------------------- iterations
@pytest.fixture(scope="module")
def small_set():
    """600 training + 100 test noisy images (noise sigma 1) of a 24-voxel map at quadrature
    poses, a float32 model at the cutoff, and a random-spheres start."""
    torch.set_num_threads(1)
    n, r = 24, 5.0
    model = make_model(n, r, dtype=torch.float32)
    truth = blobs(n, 1) * 2
    count, n_test = 600, 100
    pose = torch.randint(0, model.quadrature_size, (count + n_test,),
                         generator=torch.Generator().manual_seed(11))
    ctf = ctf_set(count + n_test, 12)
    images = simulate_at_poses(model, truth, pose, ctf, noise=1.0, seed=13)
    blocks = model.image_blocks(images.float())
    reference = low_pass(truth, r, 3)
    start = random_spheres_volume(n, 9.0, torch.Generator().manual_seed(0), dtype=F64)
    start = soft_low_pass(start, r, 2.0, 3)
    start = start * (reference.norm() / start.norm())
    train, test = slice(0, count), slice(count, count + n_test)
    return {
        "model": model, "truth": truth, "reference": reference, "start": start.float(),
        "blocks": blocks[train], "ctf": ctf.index(train), "pose": pose[train],
        "test_blocks": blocks[test], "test_ctf": ctf.index(test),
    }


def held_out_nll(data, volume) -> float:
    model = data["model"]
    slices = model.slices(volume.to(model.dtype))
    return float(model.evaluate(slices, data["test_blocks"], data["test_ctf"]).nll.mean())


@pytest.mark.parametrize("method", ["projmatch", "em"])
def test_baseline_lowers_held_out_nll_from_random_start(small_set, method):
    data = small_set
    start_nll = held_out_nll(data, data["start"])
    run = batch_em if method == "em" else projection_matching
    seen = []
    volume = run(data["model"], data["start"], data["blocks"], data["ctf"], iterations=2,
                 callback=lambda it, result: seen.append((it, result)))
    assert [it for it, _ in seen] == [1, 2]
    nll = [held_out_nll(data, r.volume) for _, r in seen]
    assert nll[0] < start_nll - 10 and nll[1] < nll[0]
    assert torch.equal(volume, seen[-1][1].volume)
    assert volume.dtype == torch.float32 and bool(torch.isfinite(volume).all())
    for _, result in seen:
        assert result.pose_index.shape == (600,) and result.score.shape == (600,)
    if method == "em":
        # the E-step NLL of the training set falls from one iteration to the next
        assert seen[1][1].mean_nll < seen[0][1].mean_nll
        assert bool(((seen[0][1].score > 0) & (seen[0][1].score <= 1)).all())
    else:
        assert seen[0][1].mean_nll is None


def test_projection_matching_given_the_right_map_converges_to_truth(small_set):
    """Started at the true map low-passed to 2 Fourier pixels (of 5), projection matching
    finds the true poses of most images, grows the band back to the cutoff and ends as good
    as a reconstruction from the true poses (the oracle)."""
    data = small_set
    model = data["model"]
    num, den = hard_statistics(model, data["blocks"], data["ctf"], data["pose"])
    oracle = closed_form_map(num, den, model, current=data["reference"].float())
    oracle_fsc = fsc_curve(oracle, data["reference"])
    volume = soft_low_pass(data["reference"], 2.0, 2.0, 3).float()
    assert fsc_curve(volume, data["reference"])[4] < 0.8
    for _ in range(3):
        result = projection_matching_iteration(model, volume, data["blocks"], data["ctf"])
        volume = result.volume
    assert (result.pose_index == data["pose"]).float().mean() > 0.9
    fsc = fsc_curve(volume, data["reference"])
    assert fsc[1:5].min() > 0.97, fsc
    assert (fsc[1:6] > oracle_fsc[1:6] - 0.05).all(), (fsc, oracle_fsc)
    # EM from the truth stays there
    em = em_iteration(model, data["reference"].float(), data["blocks"], data["ctf"])
    assert fsc_curve(em.volume, data["reference"])[1:5].min() > 0.97
    assert (em.pose_index == data["pose"]).float().mean() > 0.9


# ----------------------------------------------------------------------------------- engine
def write_particle_set(folder, count=300, n=32, pixel_size_a=4.0, seed=21):
    """A RELION 3.1 STAR file and MRC stack of noisy simulated particles; the true map."""
    from cryostoch.io.mrc import StackWriter
    from cryostoch.io.star import write_particles_star

    truth = blobs(n, seed) * 4
    rotations = random_rotations(count, torch.Generator().manual_seed(seed + 1))
    shifts = torch.zeros(count, 2, dtype=F64)
    ctf = ctf_set(count, seed + 2)
    images = simulate(truth, rotations, shifts, ctf, pixel_size_a, n / 2 - 1, 1.0, seed + 3)
    stack = folder / "stack.mrcs"
    with StackWriter(stack, count, n, np.float32, pixel_size_a) as writer:
        writer.write(0, images.float())
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [pixel_size_a], "rlnImageSize": [n],
        "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(count)],
        "rlnDefocusU": ctf.defocus_u_a.numpy(), "rlnDefocusV": ctf.defocus_v_a.numpy(),
        "rlnDefocusAngle": ctf.defocus_angle_deg.numpy(), "rlnOpticsGroup": 1,
    })
    star = folder / "particles.star"
    write_particles_star(star, optics, particles)
    return star, truth


@pytest.fixture(scope="module")
def particle_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("particles")
    return write_particle_set(folder)


def cli(monkeypatch, capsys, *args):
    import cryostoch.cli.main as cli_main

    monkeypatch.setitem(cli_main.SUBCOMMANDS, "baseline", "baseline")
    status = cli_main.main(["baseline", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("method", ["em", "projmatch"])
def test_cli_runs_end_to_end(monkeypatch, capsys, tmp_path, particle_set, method):
    star, _ = particle_set
    out = tmp_path / method
    status, stdout, _ = cli(monkeypatch, capsys, method, star, "--out", out, "--iterations", 2,
                            "--max-freq", 0.3, "--test-size", 50, "--shift-range-a", 0,
                            "--quiet")
    assert status == 0, stdout
    for name in ("map.mrc", "metrics.csv", "poses.star", "report.png", "report.html",
                 "config.json"):
        assert (out / name).is_file(), name
    assert "map:" in stdout and "held-out NLL" in stdout
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2]
    assert [int(r["gradient_evaluations"]) for r in rows] == [0, 250, 500]
    assert [float(r["epoch"]) for r in rows] == [0.0, 1.0, 2.0]
    assert all(r["learning_rate"] == "" for r in rows)
    test_nll = [float(r["test_nll"]) for r in rows]
    assert test_nll[2] < test_nll[0]
    objective = [r["minibatch_objective"] for r in rows]
    assert objective[0] == ""
    if method == "em":
        assert all(v != "" for v in objective[1:])
    else:
        assert all(v == "" for v in objective)
    info = json.loads((out / "config.json").read_text())
    assert info["baseline"]["method"] == method and info["baseline"]["iterations"] == 2
    assert "optimizer" not in info["config"]
    from cryostoch.io import open_particles, read_map

    volume, pixel = read_map(out / "map.mrc")
    assert volume.shape == (32, 32, 32) and pixel == pytest.approx(4.0)
    assert len(open_particles(out / "poses.star", check_images=False)) == 300


def test_baseline_starts_from_the_same_density_as_reconstruct(tmp_path, particle_set):
    from cryostoch.engine.baseline import BaselineConfig, BaselineRun
    from cryostoch.engine.config import ReconstructionConfig
    from cryostoch.engine.reconstruct import Reconstruction

    star, _ = particle_set
    recon = ReconstructionConfig(particles=str(star), out_dir=str(tmp_path / "a"),
                                 max_freq=0.3, test_size=50, seed=3, shift_range_a=0.0)
    stochastic = Reconstruction(recon, progress=False)
    baseline = BaselineRun(BaselineConfig("em", recon, iterations=1), progress=False)
    assert torch.equal(stochastic.volume.detach(), baseline.volume)
    assert np.array_equal(stochastic.prepared.test_rows, baseline.prepared.test_rows)
    with pytest.raises(ValueError):
        BaselineConfig("sgd", recon)
    with pytest.raises(ValueError):
        BaselineConfig("em", recon, iterations=0)


@pytest.mark.parametrize("args, needle", [
    (["annealing", "{star}"], "METHOD"),
    (["em", "{star}", "--iterations", "0"], "--iterations"),
    (["em", "{star}", "--tau2", "-1"], "--tau2"),
    (["em", "{star}", "--tau2-fudge", "0"], "--tau2-fudge"),
    (["em", "{star}", "--max-freq", "2"], "max-freq"),
    (["projmatch", "{missing}"], "absent.star"),
    (["em", "{star}", "--resolution-a", "1"], "--resolution-a"),
])
def test_cli_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, tmp_path, particle_set,
                                                args, needle):
    star, _ = particle_set
    values = {"star": star, "missing": tmp_path / "absent.star"}
    args = [a.format(**values) for a in args]
    status, stdout, stderr = cli(monkeypatch, capsys, *args, "--out", tmp_path / "out",
                                 "--quiet")
    assert status == 2
    lines = [line for line in stderr.splitlines() if line.startswith("cryostoch: error:")]
    assert len(lines) == 1 and needle in lines[0], stderr
    assert not (tmp_path / "out" / "map.mrc").exists()
