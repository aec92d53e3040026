"""Shared by the bad-input tests (issue 14): one tiny simulated set, and the check of the
convention (exit 2, one line naming the file or option)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryostoch.cli.main import main

FAST = ["--epochs", "0.05", "--max-freq", "0.15", "--test-size", "5", "--quiet"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """particles.star (+ .mrcs, ground_truth.mrc) of 200 box-32 particles at 8 A."""
    out = tmp_path_factory.mktemp("bad_input") / "sim"
    assert main(["simulate", "--volume", "phantom", "--n-particles", "200", "--box", "32",
                 "--pixel-size-a", "8", "--out", str(out), "--montage", "0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def finished(sim, tmp_path_factory) -> Path:
    """A finished reconstruction of `sim` (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["reconstruct", str(sim / "particles.star"), "--out", str(out), *FAST]) == 0
    return out


def refused(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI and check the convention: exit 2, exactly one error line, naming `names`."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cryostoch: error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Warning" not in err, err
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def reconstruct_argv(sim: Path, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(sim / "particles.star"), "--out", str(out), *FAST, *extra]


def edited_star(sim: Path, folder: Path, edit) -> Path:
    """A copy of the simulated particles.star with `edit(blocks)` applied, beside a link to
    its stack."""
    import starfile

    blocks = starfile.read(sim / "particles.star", always_dict=True)
    edit(blocks)
    folder.mkdir(exist_ok=True)
    (folder / "particles.mrcs").symlink_to(sim / "particles.mrcs")
    starfile.write(blocks, folder / "particles.star")
    return folder / "particles.star"


def write_volume(path: Path, data: np.ndarray, voxel_a: float = 8.0) -> Path:
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns of the NaN we want
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = voxel_a
    return path


