"""`cryostoch score`: held-out NLL of maps against their spherical averages (blobs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryostoch.cli.main import main
from cryostoch.evaluate.shape import spherical_average
from cryostoch.io.mrc import read_map, write_map


def test_spherical_average_keeps_radial_profile_and_removes_features():
    n = 24
    g = torch.Generator().manual_seed(0)
    volume = torch.rand(n, n, n, generator=g, dtype=torch.float64)
    blob = spherical_average(volume)
    # a direct real-space computation of the shell means
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    shells = np.rint(np.sqrt(x * x + y * y + z * z)).astype(int)
    for r in (0, 3, 7, 11):
        inside = shells == r
        assert np.allclose(blob.numpy()[inside], volume.numpy()[inside].mean())
    assert torch.allclose(spherical_average(blob), blob)  # a blob is its own average


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder holding a simulated set (sim/particles.star, box 32 at 8 A)."""
    root = tmp_path_factory.mktemp("score")
    assert main(["simulate", "--volume", "phantom", "--n-particles", "300", "--box", "32",
                 "--pixel-size-a", "8", "--snr", "0.1", "--seed", "4", "--out",
                 str(root / "sim"), "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def scored(root):
    """The ground truth, the truth scaled by 100 and its blob, scored on the simulated set."""
    truth, pixel = read_map(root / "sim" / "ground_truth.mrc")
    write_map(root / "scaled.mrc", 100 * truth, pixel)
    write_map(root / "blob.mrc", spherical_average(truth.double()).float(), pixel)
    code = main(["score", str(root / "sim" / "particles.star"), "--out", str(root / "s"),
                 "--map", str(root / "sim" / "ground_truth.mrc"), "--map",
                 str(root / "scaled.mrc"), "--map", str(root / "blob.mrc"),
                 "--max-freq", "0.4", "--shift-range-a", "0", "--test-size", "60", "--quiet"])
    assert code == 0
    return json.loads((root / "s" / "score.json").read_text())["maps"]


def test_the_truth_beats_its_blob_whatever_its_units(scored):
    truth, scaled, blob = scored
    assert truth["gain"] > 1.0, truth
    # the scale search makes the score independent of the map's units
    assert scaled["nll"] == pytest.approx(truth["nll"], abs=0.05)
    assert scaled["scale"] == pytest.approx(truth["scale"] / 100, rel=0.01)
    # a blob gains nothing over itself, and scores as the truth's blob does
    assert abs(blob["gain"]) < 1e-6
    assert blob["nll"] == pytest.approx(truth["blob_nll"], abs=0.05)


def test_score_needs_held_out_particles(tmp_path, capsys):
    star = tmp_path / "p.star"
    star.write_text("")
    assert main(["score", str(star), "--out", str(tmp_path / "o"), "--map", "m.mrc",
                 "--test-size", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test-size" in err[0]


def test_a_missing_or_mismatched_map_gives_one_line(root, tmp_path, capsys):
    star = root / "sim" / "particles.star"
    write_map(tmp_path / "small.mrc", torch.rand(16, 16, 16), 8.0)  # half the particles' box
    for path, needle in ((tmp_path / "absent.mrc", "--map takes an MRC map"),
                         (tmp_path / "small.mrc", "spans")):
        assert main(["score", str(star), "--out", str(tmp_path / "o"), "--map", str(path),
                     "--max-freq", "0.4", "--shift-range-a", "0", "--quiet"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cryostoch:")]
        assert len(err) == 1 and str(path) in err[0] and needle in err[0], err
    assert not (tmp_path / "o" / "score.json").exists()

