"""Bad maps and impossible runs (issue 14): fsc, --init, the other map readers, runs without
work, shift ranges wider than the box, and the memory estimate before anything large is
allocated. One line naming the file or option, exit 2, nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest

from bad_input_support import (
    edited_star,
    reconstruct_argv,
    refused,
    write_volume,
)
from cryostoch.cli.main import main


@pytest.mark.parametrize(("fill", "problem"), [(np.nan, "NaN"), (0.0, "every voxel is 0")])
@pytest.mark.parametrize("align", [False, True])
def test_fsc_refuses_nan_and_empty_maps(sim, tmp_path, capsys, fill, problem, align):
    bad = write_volume(tmp_path / "bad.mrc", np.full((32, 32, 32), fill))
    truth = str(sim / "ground_truth.mrc")
    extra = ["--align"] if align else []
    refused(capsys, ["fsc", truth, str(bad), *extra], str(bad), problem)
    refused(capsys, ["fsc", str(bad), truth, *extra], str(bad), problem)


def test_fsc_out_that_is_a_folder(sim, tmp_path, capsys):
    truth = str(sim / "ground_truth.mrc")
    refused(capsys, ["fsc", truth, truth, "--out", str(tmp_path)], "--out", "is a folder")
    assert not [p for p in tmp_path.iterdir() if "part" in p.name]


# --------------------------------------------------------------------- --init (4, 12, 14)
@pytest.mark.parametrize(("shape", "voxel_a", "problem"), [
    ((1, 32, 32), 8.0, "not a cubic map"),
    ((40, 32, 32), 8.0, "not a cubic map"),
    ((48, 48, 48), 8.0, "spans 48 x 8"),  # same voxel size, a larger box: not squeezed
    ((32, 32, 32), 4.0, "spans 32 x 4"),
])
def test_init_map_of_the_wrong_shape_or_size(sim, tmp_path, capsys, shape, voxel_a, problem):
    init = write_volume(tmp_path / "init.mrc", np.random.default_rng(0).random(shape), voxel_a)
    out = tmp_path / "run"
    refused(capsys, reconstruct_argv(sim, out, "--init", str(init)), str(init), problem)
    assert not out.exists()


def test_init_map_with_nan(sim, tmp_path, capsys):
    data = np.random.default_rng(0).random((32, 32, 32))
    data[3, 4, 5] = np.nan
    init = write_volume(tmp_path / "init.mrc", data)
    refused(capsys, reconstruct_argv(sim, tmp_path / "run", "--init", str(init)),
            str(init), "NaN")


def test_init_map_of_another_sampling_is_resampled(sim, tmp_path):
    """A map of the same physical box at half the voxel size is accepted."""
    from cryostoch.fourier.resample import resample_volume
    from cryostoch.io.mrc import read_map

    truth, _ = read_map(sim / "ground_truth.mrc")
    fine = write_volume(tmp_path / "fine.mrc", resample_volume(truth.double(), 64).numpy(), 4.0)
    assert main(reconstruct_argv(sim, tmp_path / "run", "--init", str(fine))) == 0


# ---------------------------------------------------------- zero work, shifts (6, 10, 11)
def test_runs_without_work_are_refused(sim, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reconstruct", str(sim / "particles.star"), "--out", str(out), "--max-freq", "0.15",
            "--quiet"]
    refused(capsys, [*argv, "--epochs", "1e-9", "--test-size", "5"], "--epochs")
    refused(capsys, [*argv, "--test-size", "200"], "--test-size", "none for training")
    one = edited_star(sim, tmp_path / "one", lambda b: b.update(particles=b["particles"][:1]))
    refused(capsys, ["reconstruct", str(one), "--out", str(out), "--max-freq", "0.15",
                     "--test-size", "0", "--epochs", "0.05", "--quiet"], "--epochs")
    assert not out.exists()


@pytest.mark.parametrize("shift", ["128", "1e6"])
def test_shift_range_wider_than_the_box(sim, tmp_path, capsys, shift):
    refused(capsys, reconstruct_argv(sim, tmp_path / "run", "--shift-range-a", shift),
            "--shift-range-a", "edge of the box")


def test_cutoff_too_close_to_nyquist(sim, tmp_path, capsys):
    refused(capsys, ["reconstruct", str(sim / "particles.star"), "--out", str(tmp_path / "r"),
                     "--max-freq", "0.9", "--quiet"], "--max-freq", "Nyquist")


def test_memory_estimated_before_allocating(sim, tmp_path, capsys, monkeypatch):
    import cryostoch.engine.checks as checks

    monkeypatch.setattr(checks, "available_bytes", lambda device: 50 * 2**20)
    out = tmp_path / "run"
    message = refused(capsys, reconstruct_argv(sim, out), "--max-freq", "GB of memory")
    assert "--box" in message
    assert not out.exists()
    refused(capsys, ["random-init", "--box", "4000", "--pixel-size-a", "1", "--out",
                     str(tmp_path / "init.mrc")], "--box", "GB of memory")
    assert not (tmp_path / "init.mrc").exists()


def test_memory_estimate_tracks_the_quadrature():
    """More directions, angles, shifts or particles: a larger estimate; the paper's setting
    (box 128 at 16% of Nyquist, 50,000 images) within a few GB."""
    from cryostoch.engine.checks import estimate_peak_bytes
    from cryostoch.engine.config import ReconstructionConfig

    def estimate(radius_px, shift_a=0.0, n=50_000):
        config = ReconstructionConfig(particles="p.star", out_dir="o")
        return estimate_peak_bytes(config, 128, 2.8, radius_px, shift_a, n)

    paper = estimate(10.24)
    assert 0.3e9 < paper < 4e9
    assert estimate(20.0) > paper and estimate(10.24, 11.2) > paper
    assert estimate(10.24, n=500_000) > paper
    assert estimate(57.6) > 50e9  # box 128 at 90% of Nyquist: refused on most machines


@pytest.mark.parametrize(("argv", "option"), [
    (["random-init", "--box", "33", "--pixel-size-a", "1"], "--box"),
    (["random-init", "--box", "32", "--pixel-size-a", "1", "--seed", "-1"], "--seed"),
])
def test_random_init_follows_the_shared_option_rules(tmp_path, capsys, argv, option):
    refused(capsys, [*argv, "--out", str(tmp_path / "init.mrc")], option)


def test_every_map_reader_refuses_nan_maps(sim, tmp_path, capsys):
    bad = write_volume(tmp_path / "bad.mrc", np.full((32, 32, 32), np.nan))
    refused(capsys, ["symmetry", str(bad), "--group", "C2", "--out", str(tmp_path / "o.mrc")],
            str(bad), "NaN")
    refused(capsys, ["simulate", "--volume", str(bad), "--n-particles", "10", "--box", "32",
                     "--pixel-size-a", "8", "--out", str(tmp_path / "s"), "--quiet"],
            str(bad), "NaN")
    assert not (tmp_path / "s").exists()
    truth = str(sim / "ground_truth.mrc")
    refused(capsys, ["fsc", truth, truth, "--align", "--aligned-out", str(tmp_path)],
            "--aligned-out", "is a folder")


