"""`cryostoch simulate` real-data hazards: coloured noise (a spectrum file or real particles'
background), junk (ice, empty, off-centre neighbours) and per-particle contrast, measured on
the written files against independent numpy computations."""

from __future__ import annotations

import json
import math

import mrcfile
import numpy as np
import pytest
import starfile
import torch

import cryostoch.cli.main as cli_main
from cryostoch.io import open_particles
from cryostoch.operators.ctf import CtfParameters
from cryostoch.simulate import (
    DefaultCtf,
    ProjectionModel,
    SimulationConfig,
    draw_particle_parameters,
    noise_seeds,
    particle_noise,
    simulate_dataset,
)
from cryostoch.simulate.hazards import (
    EMPTY,
    GOOD,
    ICE,
    ICE_BRIGHTNESS,
    NEIGHBOUR,
    Hazards,
    draw_hazards,
    hazard_images,
)
from cryostoch.simulate.noise import spectrum_from_particles

BOX, PIXEL = 32, 9.0  # the phantom (233 A with its soft edge) plus small shifts fits in 288 A
BETAGAL = "betagal_empiar10204/Extract/job009/particles.star"
SPECTRUM_CSV = """# falling noise power, like real ice
frequency_per_A, power
0.0, 4.0
0.02, 3.0
0.035, 1.5
0.0556, 1.0
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def simulate(tmp_path, name: str, **options):
    base = dict(source="phantom", n_particles=120, box_size=BOX, pixel_size_a=PIXEL, seed=3,
                pilot_size=60, n_montage=0, chunk_size=32)
    base.update(options)
    result = simulate_dataset(SimulationConfig(out_dir=str(tmp_path / name), **base),
                              progress=False)
    images = mrcfile.read(result.stack_path).astype(np.float64)
    star = starfile.read(result.star_path)["particles"]
    summary = json.loads((result.out_dir / "simulation.json").read_text())
    return images, star, summary


def shell_means(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of values (..., n, n) (numpy fft2 layout) per rounded-radius shell s <= n/2, and
    the number of full-plane coefficients per shell."""
    k = np.fft.fftfreq(n) * n
    shells = np.round(np.hypot(*np.meshgrid(k, k, indexing="ij"))).astype(int).ravel()
    keep = shells <= n // 2
    flat = values.reshape(-1, n * n).mean(0)[keep]
    counts = np.bincount(shells[keep])
    return np.bincount(shells[keep], weights=flat) / counts, counts


def test_coloured_noise_matches_the_requested_spectrum(tmp_path):
    path = tmp_path / "spectrum.csv"
    path.write_text(SPECTRUM_CSV)
    images, star, summary = simulate(tmp_path, "c", n_particles=400, junk_fraction=0.75,
                                     noise_spectrum=str(path))
    empty = images[star["rlnCryostochJunk"].to_numpy() == EMPTY]
    assert len(empty) == 100
    # requested: the table at every coefficient's |k| / (N p), mean over the full plane 1
    k = np.fft.fftfreq(BOX) * BOX
    radius_per_a = np.hypot(*np.meshgrid(k, k, indexing="ij")) / (BOX * PIXEL)
    table = np.loadtxt(path, delimiter=",", skiprows=2)
    requested = np.interp(radius_per_a, table[:, 0], table[:, 1])
    requested /= requested.mean()
    expected, counts = shell_means(requested, BOX)
    power = np.abs(np.fft.fft2(empty, norm="ortho")) ** 2
    realised, _ = shell_means(power, BOX)
    sigma = np.sqrt(2.0 / (len(empty) * counts))  # relative error of a shell's mean power
    assert np.all(np.abs(realised / expected - 1) < 5 * sigma), (realised / expected, sigma)
    assert expected[1] / expected[-1] > 2.5  # the test can tell coloured from white
    assert abs(empty.var(axis=(1, 2)).mean() - 1) < 0.03  # the SNR's unit is kept
    assert summary["noise"]["kind"] == "coloured"
    recorded = np.asarray(summary["noise"]["relative_power"])
    frequency = np.arange(BOX // 2 + 1) / (BOX * PIXEL)
    assert np.allclose(recorded, np.interp(frequency, table[:, 0], table[:, 1])
                       / np.interp(radius_per_a, table[:, 0], table[:, 1]).mean())


def test_white_noise_junk_counts_and_empty_images(tmp_path):
    n, fraction = 120, 0.5
    images, star, summary = simulate(tmp_path, "w", n_particles=n, junk_fraction=fraction)
    kinds = star["rlnCryostochJunk"].to_numpy()
    counts = np.bincount(kinds, minlength=4)
    assert counts.sum() - counts[GOOD] == round(fraction * n)
    assert counts[ICE] == counts[EMPTY] == counts[NEIGHBOUR] == 20
    assert summary["junk"]["counts"] == dict(zip(("good", "ice", "empty", "neighbour"),
                                                 counts.tolist(), strict=True))
    # empty images are exactly the current white-noise function's draws
    rows = np.flatnonzero(kinds == EMPTY)
    noise = particle_noise(noise_seeds(3, n)[rows], BOX).numpy()
    assert np.array_equal(images[rows].astype(np.float32), noise)
    mean_power = float((images[rows] ** 2).mean())
    assert abs(mean_power - 1) < 5 * math.sqrt(2 / images[rows].size)
    assert summary["junk"]["mean_signal_variance"]["empty"] == 0.0
    assert summary["noise"] == {"kind": "white", "sigma": 1.0}
    # the junk rows look like good ones; the project's reader keeps the truth column
    assert [c for c in star.columns if c.startswith("rlnCryostoch")] == ["rlnCryostochJunk"]
    assert np.isfinite(star[["rlnDefocusU", "rlnAngleRot", "rlnAngleTilt"]].to_numpy()).all()
    dataset = open_particles(tmp_path / "w" / "particles.star")
    assert np.array_equal(dataset.metadata["rlnCryostochJunk"].to_numpy(), kinds)
    assert dataset.ctf is not None and dataset.poses is not None
    # streamed: the chunk size does not change the images
    again, _, _ = simulate(tmp_path, "w7", n_particles=n, junk_fraction=fraction, chunk_size=7)
    assert np.allclose(again, images, atol=1e-5)


def test_junk_kinds_share_the_fraction():
    hazards = draw_hazards(1000, seed=1, junk_fraction=0.3)
    assert hazards.counts() == {"good": 700, "ice": 100, "empty": 100, "neighbour": 100}
    assert np.array_equal(draw_hazards(1000, seed=1, junk_fraction=0.3).kinds, hazards.kinds)
    assert not np.array_equal(draw_hazards(1000, seed=2, junk_fraction=0.3).kinds,
                              hazards.kinds)
    assert draw_hazards(50, seed=1).counts()["good"] == 50


def centre_of_energy_px(images: torch.Tensor) -> np.ndarray:
    """(B,) distance in pixels of each image's energy centre from the box centre N//2."""
    n = images.shape[-1]
    energy = images.double() ** 2
    grid = torch.arange(n, dtype=torch.float64) - n // 2
    total = energy.sum(dim=(-2, -1))
    cy = (energy.sum(-1) * grid).sum(-1) / total
    cx = (energy.sum(-2) * grid).sum(-1) / total
    return torch.hypot(cx, cy).numpy()


def test_neighbours_are_off_centre_and_ice_is_scaled():
    n = BOX
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) - n // 2,) * 3,
                             indexing="ij")
    blob = torch.exp(-(x**2 + (y - 1) ** 2 + (z + 1) ** 2) / (2 * 2.0**2))  # compact
    model = ProjectionModel(blob, PIXEL)
    b = 24
    params = draw_particle_parameters(b, DefaultCtf(), seed=0)
    flat = CtfParameters.from_values(  # a constant CTF: the energy stays where the density is
        b, defocus_u_a=0.0, defocus_v_a=0.0, defocus_angle_deg=0.0, voltage_kv=300.0,
        spherical_aberration_mm=0.0, amplitude_contrast=1.0)
    params = type(params)(params.euler_deg, params.rotations, params.shifts_px, flat,
                          params.optics_index)
    kinds = np.array([GOOD, NEIGHBOUR, ICE, EMPTY] * (b // 4), dtype=np.int8)
    seeds = np.random.SeedSequence(9).generate_state(b, np.uint64)
    with torch.no_grad():
        images = hazard_images(model, params, Hazards(kinds, np.ones(b), seeds), 0.5)
    distance = centre_of_energy_px(images)
    assert np.all(distance[kinds == GOOD] < 0.1 * n), distance[kinds == GOOD]
    assert np.all(distance[kinds == NEIGHBOUR] > 0.3 * n), distance[kinds == NEIGHBOUR]
    assert torch.equal(images[kinds == EMPTY], torch.zeros(b // 4, n, n, dtype=images.dtype))
    ice_variance = images[kinds == ICE].var(dim=(-2, -1), unbiased=False).numpy() / 0.5
    low, high = ICE_BRIGHTNESS
    assert np.all((ice_variance > low * 0.999) & (ice_variance < high * 1.001)), ice_variance


def test_contrast_factors_with_shifts_and_junk(tmp_path):
    hazards = draw_hazards(4000, seed=5, contrast_sigma=0.3)
    log_factor = np.log(hazards.contrast)
    assert abs(log_factor.std() - 0.3) < 5 * 0.3 / math.sqrt(2 * 4000)
    assert abs(log_factor.mean()) < 5 * 0.3 / math.sqrt(4000)
    # the same particles with and without contrast: (image - noise) scales by the factor
    common = dict(n_particles=60, shift_sigma_a=4.0, junk_fraction=0.3, snr=2.0)
    scaled, star, summary = simulate(tmp_path, "s", contrast_sigma=0.4, **common)
    plain, star0, _ = simulate(tmp_path, "p", **common)
    factor = star["rlnCryostochScale"].to_numpy()
    assert abs(summary["contrast"]["realised_log_std"] - np.log(factor).std()) < 1e-9
    assert np.array_equal(star["rlnOriginXAngst"], star0["rlnOriginXAngst"])
    assert np.array_equal(star["rlnCryostochJunk"], star0["rlnCryostochJunk"])
    assert "rlnCryostochScale" not in star0.columns
    noise = particle_noise(noise_seeds(3, 60), BOX).double().numpy()
    expected = factor[:, None, None] * (plain - noise)
    assert np.abs((scaled - noise) - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(factor - 1).max() > 0.1


def test_noise_from_real_betagal_falls_with_frequency(shared_data, tmp_path, monkeypatch):
    star = shared_data / BETAGAL
    if not star.exists():
        pytest.skip(f"{star} not found")
    table = spectrum_from_particles(star)  # what --noise-from reads
    f, power = table.frequency_per_a, table.power
    low = power[(f >= 1 / 226) & (f <= 1 / 45)].mean()
    high = power[(f >= 1 / 11) & (f <= 1 / 8)].mean()
    assert 3.0 < low / high < 4.5, low / high
    # through the CLI, resampled onto a 32 px box of 9 A (Nyquist 1/18 A)
    monkeypatch.setitem(cli_main.SUBCOMMANDS, "simulate", "simulate")
    out = tmp_path / "b"
    assert cli_main.main(["simulate", "--volume", "phantom", "--n-particles", "12", "--box",
                          str(BOX), "--pixel-size-a", str(PIXEL), "--out", str(out),
                          "--quiet", "--montage", "0", "--noise-from", str(star)]) == 0
    noise = json.loads((out / "simulation.json").read_text())["noise"]
    assert noise["kind"] == "coloured" and "betagal" in noise["source"]
    relative = np.asarray(noise["relative_power"])
    assert np.allclose(relative / relative[-1],
                       np.interp(noise["frequency_per_a"], f, power) / table.at(1 / 18),
                       rtol=0.05)
    assert relative[2] > 1.5 * relative[-1]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"--noise-spectrum": "missing.csv"}, ["missing.csv", "no such file"]),
        ({"--noise-spectrum": "GARBLED"}, ["garbled.csv", "line 3"]),
        ({"--noise-spectrum": "ONE_ROW"}, ["one_row.csv", "at least 2 rows"]),
        ({"--noise-spectrum": "THREE"}, ["three.csv", "expected 2 columns"]),
        ({"--noise-spectrum": "DECREASING"}, ["decreasing.csv", "strictly increasing"]),
        ({"--noise-spectrum": "GOOD", "--noise-from": "GOOD"}, ["--noise-from", "not both"]),
        ({"--noise-from": "missing.star"}, ["missing.star", "no such file"]),
        ({"--junk-fraction": "1"}, ["--junk-fraction", "[0, 1)"]),
        ({"--junk-fraction": "-0.1"}, ["--junk-fraction", "[0, 1)"]),
        ({"--contrast-sigma": "-1"}, ["--contrast-sigma", ">= 0"]),
    ],
)
def test_bad_hazard_options_are_one_line(tmp_path, capsys, monkeypatch, change, needles):
    files = {"GARBLED": "garbled.csv", "ONE_ROW": "one_row.csv", "THREE": "three.csv",
             "DECREASING": "decreasing.csv", "GOOD": "good.csv"}
    (tmp_path / "garbled.csv").write_text("freq,power\n0,1\n0.01,lots\n")
    (tmp_path / "one_row.csv").write_text("0 1\n")
    (tmp_path / "three.csv").write_text("0 1 2\n0.1 1 2\n")
    (tmp_path / "decreasing.csv").write_text("0.1 1\n0.0 1\n")
    (tmp_path / "good.csv").write_text("0 1\n0.1 1\n")
    monkeypatch.setitem(cli_main.SUBCOMMANDS, "simulate", "simulate")
    argv = ["simulate", "--volume", "phantom", "--n-particles", "4", "--box", str(BOX),
            "--pixel-size-a", str(PIXEL), "--out", str(tmp_path / "out"), "--quiet"]
    paths = {**files, "missing.csv": "missing.csv", "missing.star": "missing.star"}
    for key, value in change.items():
        argv += [key, str(tmp_path / paths[value]) if value in paths else value]
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cryostoch: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out" / "particles.star").exists()
