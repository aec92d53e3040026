"""Post-processing of half maps (cryostoch.evaluate.postprocess) and `cryostoch postprocess`.

Expected values come from numpy FFTs and closed forms written here, never from the code's own
output.
"""

from __future__ import annotations

import json
import math
import warnings

import mrcfile
import numpy as np
import pytest
import torch

from cryostoch.evaluate.postprocess import (
    corrected_fsc,
    fsc_weights,
    guinier_fit,
    postprocess_halves,
    randomize_phases_beyond,
)

# ---------------------------------------------------------------------------------------------
# helpers (independent of the code under test: numpy's full FFT, shells of rounded radius)
# ---------------------------------------------------------------------------------------------


def radius_grid(n: int) -> np.ndarray:
    """|k| in cycles per box for numpy's uncentred full FFT layout."""
    k = np.fft.fftfreq(n, 1.0 / n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.sqrt(kx**2 + ky**2 + kz**2)


def shell_sum(values: np.ndarray, n: int) -> np.ndarray:
    r = np.rint(radius_grid(n)).astype(int).ravel()
    keep = r <= n // 2
    return np.bincount(r[keep], weights=values.ravel()[keep], minlength=n // 2 + 1)


def numpy_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    cross = shell_sum(np.real(fa * np.conj(fb)), a.shape[0])
    return cross / np.sqrt(shell_sum(np.abs(fa) ** 2, a.shape[0])
                           * shell_sum(np.abs(fb) ** 2, a.shape[0]))


def fourier_filter(volume: np.ndarray, factor) -> np.ndarray:
    """Multiply the spectrum by `factor(|k|)` (|k| in cycles per box)."""
    n = volume.shape[0]
    return np.real(np.fft.ifftn(np.fft.fftn(volume) * factor(radius_grid(n))))


def guinier_slope(volume: np.ndarray, pixel: float, low_a: float, high_a: float) -> float:
    """Least-squares slope of ln(mean |F| per shell) against s^2 over shells low_a..high_a."""
    n = volume.shape[0]
    amplitude = shell_sum(np.abs(np.fft.fftn(volume)), n) / shell_sum(np.ones((n,) * 3), n)
    k = np.arange(n // 2 + 1)
    use = (k >= n * pixel / low_a) & (k <= n * pixel / high_a)
    s2 = (k[use] / (n * pixel)) ** 2
    return float(np.polyfit(s2, np.log(amplitude[use]), 1)[0])


def ball(n: int, radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
            <= radius**2).astype(np.float64)


def gaussian_blob(n: int, sigma: float, centre=(0.0, 0.0, 0.0), weight=1.0) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return weight * np.exp(-d2 / (2 * sigma**2))


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def molecule(n: int) -> np.ndarray:
    """A small two-lobed particle near the box centre."""
    return (gaussian_blob(n, 2.5, (2, 0, -1)) + gaussian_blob(n, 2.0, (-4, 3, 1), 0.7)
            + gaussian_blob(n, 1.5, (1, -4, 3), 0.5))


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


def test_phase_randomisation_keeps_amplitudes_and_decorrelates_beyond_the_shell():
    n, shell = 32, 6
    rng = np.random.default_rng(0)
    volume = fourier_filter(rng.standard_normal((n, n, n)), lambda k: np.exp(-(k / 10) ** 2))
    g = torch.Generator().manual_seed(3)
    a = randomize_phases_beyond(t64(volume), shell, g).numpy()
    b = randomize_phases_beyond(t64(volume), shell, g).numpy()
    fa, fv = np.fft.fftn(a), np.fft.fftn(volume)
    # a real map (irfft) whose every coefficient keeps its amplitude, including the kx = 0 and
    # Nyquist planes: the random phases are Hermitian-consistent
    np.testing.assert_allclose(np.abs(fa), np.abs(fv), rtol=1e-9, atol=1e-9)
    r = np.rint(radius_grid(n))
    np.testing.assert_allclose(fa[r <= shell], fv[r <= shell], atol=1e-9)  # untouched
    fsc_self = numpy_fsc(volume, a)
    fsc_pair = numpy_fsc(a, b)  # two independent randomisations of the same map
    np.testing.assert_allclose(fsc_self[: shell + 1], 1.0, atol=1e-9)
    # beyond: ~0 (standard error ~ 1/sqrt(coefficients per shell) < 0.05)
    assert np.abs(fsc_self[shell + 1:]).max() < 0.15
    assert np.abs(fsc_pair[shell + 1:]).max() < 0.15
    assert abs(fsc_pair[shell + 1:].mean()) < 0.05


def test_corrected_fsc_and_weights_follow_the_formulas():
    masked = torch.tensor([1.0, 0.95, 0.9, 0.7, 0.6, 0.3, 0.2], dtype=torch.float64)
    rand = torch.tensor([1.0, 0.95, 0.9, 0.6, 0.5, 0.1, 1.0], dtype=torch.float64)
    got = corrected_fsc(masked, rand, 2)  # randomised beyond shell 2, corrected from shell 4
    expected = [1.0, 0.95, 0.9, 0.7, (0.6 - 0.5) / 0.5, (0.3 - 0.1) / 0.9, 0.2]  # rand 1: kept
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    fsc = torch.tensor([1.0, 0.5, 0.143, 0.0, -0.3, 1.2])
    w = [1.0, math.sqrt(1 / 1.5), math.sqrt(0.286 / 1.143), 0.0, 0.0, 1.0]
    np.testing.assert_allclose(fsc_weights(fsc).numpy(), w, atol=1e-12)


def test_fsc_weighting_of_the_final_map_uses_the_formula():
    """With no B-factor and the low-pass at Nyquist out of the way, the unsharpened map is the
    average of the halves with shell k multiplied by sqrt(2 FSC_k / (1 + FSC_k))."""
    n, pixel = 24, 2.0
    rng = np.random.default_rng(1)
    truth = fourier_filter(rng.standard_normal((n, n, n)), lambda k: np.exp(-(k / 5) ** 2))
    h1 = truth + 0.05 * rng.standard_normal((n, n, n))
    h2 = truth + 0.05 * rng.standard_normal((n, n, n))
    result = postprocess_halves(t64(h1), t64(h2), pixel, mask=torch.ones(n, n, n,
                                dtype=torch.float64), bfactor=0.0)
    fsc = result.fsc_corrected.numpy().clip(0, 1)
    weight = np.sqrt(2 * fsc / (1 + fsc))
    weight[0] = 1.0
    r = np.rint(radius_grid(n)).astype(int)
    per_coefficient = np.where(r <= n // 2, weight[np.minimum(r, n // 2)], 0.0)
    k_res = n * pixel / result.resolution_a
    t = np.clip((radius_grid(n) - (k_res - 1)) / 2, 0, 1)
    lowpass = 0.5 * (1 + np.cos(np.pi * t))
    expected = np.real(np.fft.ifftn(np.fft.fftn((h1 + h2) / 2) * per_coefficient * lowpass))
    np.testing.assert_allclose(result.map_unsharpened.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(result.map_sharpened.numpy(), expected, atol=1e-10)  # B = 0
    assert 0.3 < fsc[6] < 0.99  # a test that weights something


def test_corrected_fsc_matches_the_expected_snr_curve():
    """Halves = truth + independent white noise: inside a mask m the expected FSC per shell is
    S / (S + sigma^2 mean(m^2) N_k), S the shell power of m * truth, N_k its coefficient count."""
    n, pixel, sigma = 32, 2.0, 0.03
    rng = np.random.default_rng(2)
    truth = molecule(n)
    h1 = truth + sigma * rng.standard_normal((n, n, n))
    h2 = truth + sigma * rng.standard_normal((n, n, n))
    mask = fourier_filter(ball(n, 10.0), lambda k: np.exp(-(k / 6) ** 2)).clip(0, 1)
    signal = shell_sum(np.abs(np.fft.fftn(mask * truth)) ** 2, n)
    noise = sigma**2 * np.mean(mask**2) * n**3 * shell_sum(np.ones((n,) * 3), n)
    expected = signal / (signal + noise)
    result = postprocess_halves(t64(h1), t64(h2), pixel, mask=t64(mask),
                                generator=torch.Generator().manual_seed(0))
    got = result.fsc_corrected.numpy()
    assert np.abs(got[1:] - expected[1:]).max() < 0.15
    assert np.abs(got[1:] - expected[1:]).mean() < 0.05
    # resolution: where the analytic curve crosses 0.143 (linear in frequency), within half a
    # shell (the crossing lies mid-box: a test that means something)
    k = int(np.argmax(expected[1:] < 0.143)) + 1
    k_expected = k - 1 + (expected[k - 1] - 0.143) / (expected[k - 1] - expected[k])
    assert 6 < k_expected < 12
    assert n * pixel / result.resolution_a == pytest.approx(k_expected, abs=0.5)


def test_phase_randomisation_removes_the_correlation_a_sharp_mask_adds():
    """Halves share a signal only up to shell 6, beyond it only independent noise: the true
    FSC there is 0. A hard mask spreads the shared signal outward and inflates the masked
    FSC; the corrected FSC is ~0 again (each shell is noisy: few voxels inside the mask)."""
    n, pixel, cut = 40, 2.0, 6
    rng = np.random.default_rng(4)
    signal = fourier_filter(rng.standard_normal((n, n, n)), lambda k: (k <= cut) * 1.0)
    h1 = signal + 0.05 * rng.standard_normal((n, n, n))
    h2 = signal + 0.05 * rng.standard_normal((n, n, n))
    mask = ball(n, 10.0)  # binary: a sharp edge
    result = postprocess_halves(t64(h1), t64(h2), pixel, mask=t64(mask),
                                randomize_at_a=n * pixel / cut,
                                generator=torch.Generator().manual_seed(1))
    assert result.randomize_shell == cut
    beyond = slice(cut + 2, n // 2 + 1)
    masked, corrected = result.fsc_masked.numpy()[beyond], result.fsc_corrected.numpy()[beyond]
    assert masked.mean() > 0.3  # the artefact the correction is for
    assert abs(corrected.mean()) < 0.08
    assert np.median(np.abs(corrected)) < 0.15


def misplaced_mask_halves(n: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Halves of a particle with fine detail on one side (x < 0: white noise inside a ball) and
    a smooth Gaussian on the other, and a mask over the smooth side only: inside the mask the
    halves agree only at low frequency, outside it they agree to the finest shells."""
    rng = np.random.default_rng(11)
    detail = ball(n, 6.0, (-8, 0, 0)) * rng.standard_normal((n, n, n))
    truth = detail + gaussian_blob(n, 3.0, (8, 0, 0), 3.0)
    mask = fourier_filter(ball(n, 7.0, (8, 0, 0)), lambda k: np.exp(-(k / 8) ** 2)).clip(0, 1)
    h1 = truth + 0.1 * rng.standard_normal((n, n, n))
    h2 = truth + 0.1 * rng.standard_normal((n, n, n))
    return h1, h2, mask


def numpy_last_shell_above(fsc: np.ndarray, threshold: float = 0.143) -> int:
    below = np.nonzero(fsc[1:] < threshold)[0]
    return int(below[0]) if len(below) else len(fsc) - 1


def test_a_mask_that_misses_the_particle_is_skipped_as_relion_does():
    """RELION's rule: when the unmasked FSC stays above 0.143 to a finer shell than the masked,
    corrected one, the unmasked curve gives the resolution and the weights (unless forced)."""
    n, pixel = 32, 2.0
    h1, h2, mask = misplaced_mask_halves(n)
    unmasked = numpy_fsc(h1, h2)
    k_unmasked = numpy_last_shell_above(unmasked)
    assert k_unmasked >= 12  # the detail side agrees far out
    result = postprocess_halves(t64(h1), t64(h2), pixel, mask=t64(mask), bfactor=0.0,
                                generator=torch.Generator().manual_seed(0))
    k_corrected = numpy_last_shell_above(result.fsc_corrected.numpy())
    assert k_corrected <= k_unmasked - 4  # inside the mask only the smooth side: a short curve
    assert result.mask_skipped and result.final_curve_name == "unmasked"
    np.testing.assert_allclose(result.fsc_final.numpy(), unmasked, atol=1e-9)
    assert k_unmasked <= n * pixel / result.resolution_a < k_unmasked + 1
    assert result.resolution_corrected_a > result.resolution_a
    assert any("unmasked FSC extends beyond" in w for w in result.warnings)
    forced = postprocess_halves(t64(h1), t64(h2), pixel, mask=t64(mask), bfactor=0.0,
                                force_mask=True, generator=torch.Generator().manual_seed(0))
    assert not forced.mask_skipped and forced.final_curve_name == "corrected"
    assert forced.resolution_a == pytest.approx(result.resolution_corrected_a)
    # the map is weighted by the curve used: the skipped mask's map keeps more of shell 10
    shell = np.rint(radius_grid(n)).astype(int) == 10
    power = [np.abs(np.fft.fftn(r.map_unsharpened.numpy()))[shell].sum() for r in (result, forced)]
    assert power[0] > 2 * power[1]


def test_guinier_fit_recovers_the_bfactor_and_sharpening_flattens_the_spectrum():
    n, pixel, b0 = 48, 1.5, 150.0
    rng = np.random.default_rng(5)
    # "atoms": white noise inside a soft ball has a flat mean amplitude per shell
    envelope = fourier_filter(ball(n, 16.0), lambda k: np.exp(-(k / 8) ** 2)).clip(0, 1)
    atoms = rng.standard_normal((n, n, n)) * envelope
    blurred = fourier_filter(atoms, lambda k: np.exp(-b0 * (k / (n * pixel)) ** 2 / 4))
    ones = torch.ones(n, n, n, dtype=torch.float64)
    result = postprocess_halves(t64(blurred), t64(blurred), pixel, mask=ones)
    assert result.bfactor_source == "guinier"
    assert result.guinier.low_a == 10.0 and result.guinier.high_a == pytest.approx(2 * pixel)
    assert result.bfactor == pytest.approx(-b0, rel=0.1)
    assert 4 * guinier_slope(blurred, pixel, 10.0, 3.5) == pytest.approx(-b0, rel=0.1)
    # after sharpening the spectrum is flat again (away from the low-pass edge at Nyquist)
    sharpened = result.map_sharpened.numpy()
    assert abs(4 * guinier_slope(sharpened, pixel, 10.0, 3.5)) < 0.1 * b0
    # an explicit B overrides the fit
    given = postprocess_halves(t64(blurred), t64(blurred), pixel, mask=ones, bfactor=-50.0)
    assert given.bfactor == -50.0 and given.bfactor_source == "given"
    slope = 4 * guinier_slope(given.map_sharpened.numpy(), pixel, 10.0, 3.5)
    assert slope == pytest.approx(-b0 + 50.0, rel=0.1)


def test_auto_mask_covers_the_particle_and_is_soft():
    n, pixel = 40, 2.0
    rng = np.random.default_rng(6)
    truth = molecule(n)
    h1 = truth + 0.05 * rng.standard_normal((n, n, n))
    h2 = truth + 0.05 * rng.standard_normal((n, n, n))
    result = postprocess_halves(t64(h1).float(), t64(h2).float(), pixel)
    assert not result.mask_skipped and result.warnings == []  # around the particle: kept
    assert result.resolution_a == pytest.approx(result.resolution_corrected_a)
    mask = result.mask.double().numpy()
    assert result.mask_auto and result.mask.dtype == torch.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask[truth > 0.05 * truth.max()].min() > 0.99  # covers the particle
    assert 0.02 < mask.mean() < 0.4  # and not the box
    assert mask[0].max() == 0.0 and mask[:, 0].max() == 0.0  # nothing at the box edges
    soft = (mask > 0.01) & (mask < 0.99)
    assert soft.sum() > 0.3 * (mask >= 0.99).sum()  # a soft edge, not a step
    steps = [np.abs(np.diff(mask, axis=a)).max() for a in range(3)]
    assert max(steps) < 0.5
    assert result.mask_fraction == pytest.approx(mask.mean())


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def write_mrc(path, volume, voxel):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(volume, dtype=np.float32))
        mrc.voxel_size = voxel


@pytest.fixture
def command():
    from cryostoch.cli import main as cli_main

    return cli_main.main


@pytest.fixture
def halves(tmp_path):
    n = 32
    rng = np.random.default_rng(7)
    truth = molecule(n)
    paths = tmp_path / "half1.mrc", tmp_path / "half2.mrc"
    for path in paths:
        write_mrc(path, truth + 0.03 * rng.standard_normal((n, n, n)), 2.0)
    return paths


def test_cli_postprocess_writes_every_file(tmp_path, halves, command, capsys):
    out = tmp_path / "pp"
    assert command(["postprocess", str(halves[0]), str(halves[1]), "--out", str(out),
                    "--seed", "3"]) == 0
    assert "resolution at FSC = 0.143" in capsys.readouterr().out
    names = {"map.mrc", "map_unsharpened.mrc", "mask.mrc", "fsc.csv", "fsc.png",
             "guinier.png", "postprocess.json"}
    assert {p.name for p in out.iterdir()} == names  # no temporaries left behind
    for name in ("map.mrc", "map_unsharpened.mrc", "mask.mrc"):
        with mrcfile.open(out / name) as mrc:
            assert mrc.data.shape == (32, 32, 32)
            assert float(mrc.voxel_size.x) == pytest.approx(2.0)
            assert np.isfinite(mrc.data).all()
    header = (out / "fsc.csv").read_text().splitlines()
    assert header[0] == ("shell,resolution_a,fsc_unmasked,fsc_masked,fsc_randomized,"
                         "fsc_corrected")
    assert len(header) == 1 + 17
    summary = json.loads((out / "postprocess.json").read_text())
    for key in ("resolution_a", "resolution_05_a", "bfactor_a2", "mask_fraction",
                "randomize_at_a"):
        assert key in summary
    assert 4.0 <= summary["resolution_a"] < 20.0 and summary["mask"] == "auto"
    for name in ("fsc.png", "guinier.png"):
        assert (out / name).stat().st_size > 5000
    # a folder with results is refused, then replaced with --overwrite and a given mask
    args = ["postprocess", str(halves[0]), str(halves[1]), "--out", str(out)]
    assert command(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    with mrcfile.open(out / "mask.mrc") as mrc:
        write_mrc(tmp_path / "mask.mrc", mrc.data, 2.0)
    assert command(args + ["--overwrite", "--mask", str(tmp_path / "mask.mrc"),
                           "--bfactor", "-40", "--randomize-at-a", "12"]) == 0
    summary = json.loads((out / "postprocess.json").read_text())
    assert summary["mask"] == "given" and summary["bfactor_a2"] == -40.0
    assert summary["randomize_at_a"] == pytest.approx(64 / 5)


def bad_inputs(tmp_path, halves):
    """(name, extra files to write, arguments after the halves, text the error must hold)."""
    rng = np.random.default_rng(8)
    noise = rng.standard_normal((32, 32, 32))
    small = tmp_path / "small.mrc"
    write_mrc(small, rng.standard_normal((24, 24, 24)), 2.0)
    other_pixel = tmp_path / "pix.mrc"
    write_mrc(other_pixel, noise, 2.6)
    nan_map = tmp_path / "nan.mrc"
    with warnings.catch_warnings():  # mrcfile warns about the NaNs this file is for
        warnings.simplefilter("ignore", RuntimeWarning)
        write_mrc(nan_map, np.where(noise > 2, np.nan, noise), 2.0)
    mask24 = tmp_path / "mask24.mrc"
    write_mrc(mask24, np.ones((24, 24, 24)), 2.0)
    mask_pixel = tmp_path / "mask_pixel.mrc"
    write_mrc(mask_pixel, ball(32, 8.0), 3.0)
    mask_range = tmp_path / "mask_range.mrc"
    write_mrc(mask_range, 2 * ball(32, 8.0), 2.0)
    h1, h2 = str(halves[0]), str(halves[1])
    return [
        ([h1, str(small)], "small.mrc"),
        ([h1, str(other_pixel)], "pix.mrc"),
        ([h1, str(nan_map)], "NaN"),
        ([h1, str(tmp_path / "missing.mrc")], "missing.mrc"),
        ([h1, h2, "--mask", str(mask24)], "mask24.mrc"),
        ([h1, h2, "--mask", str(mask_range)], "[0, 1]"),
        ([h1, h2, "--mask", str(mask_pixel)], "voxel size"),
        ([h1, h2, "--mask", str(tmp_path / "nomask.mrc")], "nomask.mrc"),
        ([h1, h2, "--randomize-at-a", "3"], "Nyquist"),
        ([h1, h2, "--randomize-at-a", "-5"], "--randomize-at-a"),
        ([h1, h2, "--out", str(halves[0])], "is a file"),
    ]


def test_cli_postprocess_refuses_bad_input_in_one_line(tmp_path, halves, command, capsys):
    for args, text in bad_inputs(tmp_path, halves):
        out = tmp_path / "out"
        argv = ["postprocess", *args]
        if "--out" not in argv:
            argv += ["--out", str(out)]
        assert command(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("cryostoch: error:") and text in err, (args, err)
        assert not (out / "map.mrc").exists()


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    """A failure while writing (here: the disk fills up at the last map) leaves neither
    map.mrc nor any other result nor a temporary file behind."""
    from cryostoch.evaluate import postprocess_output

    n = 16
    rng = np.random.default_rng(9)
    truth = molecule(n)
    result = postprocess_halves(t64(truth + 0.02 * rng.standard_normal((n, n, n))),
                                t64(truth + 0.02 * rng.standard_normal((n, n, n))), 2.0)
    real_write_map = postprocess_output.write_map
    calls = []

    def failing_write_map(path, volume, voxel):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real_write_map(path, volume, voxel)

    monkeypatch.setattr(postprocess_output, "write_map", failing_write_map)
    out = tmp_path / "pp"
    with pytest.raises(OSError):
        postprocess_output.write_postprocess(result, out, 2.0)
    assert len(calls) == 3 and list(out.iterdir()) == []


def test_no_guinier_bfactor_for_a_map_that_stops_short_of_10_a():
    """Three shells beyond 10 A are needed: a 20 A map (box 32 at 5 A: 10 A is shell 16, the
    map stops at shell 8) gets no fit; at 2 A per pixel a 6 A map is fitted over 10-6 A."""
    box = 32
    for pixel, resolution, expected in ((5.0, 20.0, None), (2.0, 6.0, -200.0)):
        s2 = (torch.arange(box // 2 + 1, dtype=torch.float64) / (box * pixel)) ** 2
        fit = guinier_fit(s2, 3.0 - 50.0 * s2, box, pixel, resolution)  # B = 4 * -50
        if expected is None:
            assert fit is None
        else:
            assert fit is not None and fit.low_a == 10.0
            assert abs(fit.bfactor - expected) < 1e-6
