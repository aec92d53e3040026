"""Bad input, faults and stale outputs (issue 14): one line naming the file or option, exit 2,
and nothing left behind that looks like a finished result.

One tiny simulated set (box 32, 200 particles; `bad_input_support`) serves every test; runs
use a few hundred gradient evaluations at a coarse cutoff, so the file takes seconds. Bad maps
and impossible runs (fsc, --init, no work, shift range, memory) are in test_bad_input_maps.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bad_input_support import (
    FAST,
    edited_star,
    reconstruct_argv,
    refused,
    write_volume,
)
from cryostoch.cli.main import main


# -------------------------------------------------------------- options (10, 18)
@pytest.mark.parametrize(("extra", "names"), [
    (["--lr", "inf"], ["lr", "finite"]),
    (["--lambda-plus", "nan"], ["lambda-plus", "finite"]),
    (["--shift-range-a", "inf"], ["shift-range-a", "finite"]),
    (["--device", "foo"], ["device", "foo"]),
    (["--seed", "-1"], ["seed"]),
    (["--resolution-a", "inf"], ["resolution-a", "finite"]),
])
def test_bad_options_refused_before_any_work(sim, tmp_path, capsys, extra, names):
    out = tmp_path / "out"
    refused(capsys, reconstruct_argv(sim, out, *extra), *names)
    if extra[0] not in ("--lr", "--lambda-plus"):  # the options the baselines share
        refused(capsys, ["baseline", "em", str(sim / "particles.star"), "--out", str(out),
                         "--max-freq", "0.15", "--quiet", *extra], *names)
    assert not out.exists()


# ------------------------------------------------------- the output folder (3, 9, 17)
def test_out_that_is_a_file(sim, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    refused(capsys, reconstruct_argv(sim, target), str(target), "not a folder")
    assert target.read_text() == "x"


def test_finished_folder_refused_unless_overwrite(sim, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = (out / "map.mrc").read_bytes()
    refused(capsys, reconstruct_argv(sim, out), str(out), "--overwrite", "--resume")
    assert (out / "map.mrc").read_bytes() == before
    refused(capsys, ["baseline", "em", str(sim / "particles.star"), "--out", str(out),
                     "--iterations", "1", "--max-freq", "0.15", "--test-size", "5", "--quiet"],
            str(out), "--overwrite")
    refused(capsys, reconstruct_argv(sim, out, "--overwrite", "--resume"), "--overwrite")


def test_resume_without_a_checkpoint_keeps_the_old_run(sim, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint.pt").unlink()
    refused(capsys, reconstruct_argv(sim, out, "--resume"), str(out), "no checkpoint.pt")
    assert (out / "map.mrc").exists()


def test_overwrite_replaces_every_output(sim, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "class_07.mrc").write_text("stale")  # another run's leftovers go too
    (out / ".partial-map.mrc").write_text("killed")  # a killed run's temporary
    assert main(reconstruct_argv(sim, out, "--overwrite", "--seed", "3")) == 0
    assert not (out / "class_07.mrc").exists() and not (out / ".partial-map.mrc").exists()
    assert '"seed": 3' in (out / "config.json").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unwritable_out_folder(sim, tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: fail the way a locked folder does
        import cryostoch.engine.run_folder as run_folder

        def locked(folder):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(run_folder, "_check_writable", locked)
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        refused(capsys, reconstruct_argv(sim, out), str(out), "cannot write")
    finally:
        out.chmod(0o700)


def test_failed_run_leaves_no_folder(sim, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    refused(capsys, reconstruct_argv(sim, out, "--box", "48"), "--box")
    assert not out.exists()


# ---------------------------------------------------------------- divergence (2)
def test_divergence_writes_no_map_and_no_snapshot(sim, tmp_path, capsys):
    out = tmp_path / "run"
    refused(capsys, reconstruct_argv(sim, out, "--lr", "1e30", "--snapshots", "100"),
            "diverged", "--lr")
    assert not (out / "map.mrc").exists()
    assert not list(out.glob("snapshots/*.mrc"))


# ---------------------------------------------------------------- checkpoints (8)
def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "folder":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "folder"])
def test_damaged_checkpoint(sim, finished, tmp_path, capsys, how):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _damage(out / "checkpoint.pt", how)
    refused(capsys, reconstruct_argv(sim, out, "--resume"), "checkpoint.pt")


def test_checkpoint_with_code_is_not_run(sim, finished, tmp_path, capsys):
    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    torch.save({"config": Payload(), "volume": 0, "optimizer": 0, "run": 0},
               out / "checkpoint.pt")
    refused(capsys, reconstruct_argv(sim, out, "--resume"), "checkpoint.pt", "not loaded")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "tonga", "olbfgs",
                                  "hf", "adam"])
def test_every_optimizer_state_loads_weights_only(tmp_path, name):
    """What a checkpoint holds of each optimiser survives `torch.load(weights_only=True)`."""
    import torch

    from cryostoch.optim.factory import make_optimizer

    x = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    target = torch.linspace(-1, 1, 50, dtype=torch.float64)
    optimizer = make_optimizer(name, [x], lr=0.1)

    def closure():
        x.grad = 2 * (x.detach() - target)
        return float(((x.detach() - target) ** 2).sum())

    for _ in range(3):
        optimizer.step(closure)
    torch.save({"optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    make_optimizer(name, [x], lr=0.1).load_state_dict(loaded["optimizer"])


# ------------------------------------------------- particle files, every reader (5, 7, 15)
def _set(block: str, column: str, row: int, value: float):
    def edit(blocks):
        blocks[block].loc[row, column] = value
    return edit


IMPOSSIBLE_CTF = {
    "negative defocus": (_set("particles", "rlnDefocusU", 4, -5000.0), "rlnDefocusU"),
    "zero defocus": (_set("particles", "rlnDefocusV", 0, 0.0), "rlnDefocusV"),
    "voltage in volts": (_set("optics", "rlnVoltage", 0, 300000.0), "rlnVoltage"),
    "Cs in micrometres": (_set("optics", "rlnSphericalAberration", 0, 2700.0),
                          "rlnSphericalAberration"),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_CTF))
def test_impossible_ctf_refused_by_every_command(sim, tmp_path, capsys, case):
    edit, column = IMPOSSIBLE_CTF[case]
    star = edited_star(sim, tmp_path / "data", edit)
    refused(capsys, ["info", str(star)], str(star), column)
    out = tmp_path / "run"
    refused(capsys, ["reconstruct", str(star), "--out", str(out), *FAST], str(star), column)
    assert not out.exists()
    sim_out = tmp_path / "sim"
    refused(capsys, ["simulate", "--volume", "phantom", "--n-particles", "10", "--box", "32",
                     "--pixel-size-a", "8", "--out", str(sim_out), "--ctf-table", str(star),
                     "--quiet"], str(star), column)
    assert not (sim_out / "particles.star").exists()


def test_duplicated_star_column(sim, tmp_path, capsys):
    text = (sim / "particles.star").read_text().splitlines()
    header = text.index("_rlnOriginYAngst #13")
    rows = [line + "\t1.0" if "@particles.mrcs" in line else line for line in text]
    rows.insert(header + 1, "_rlnDefocusU #14")
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "particles.mrcs").symlink_to(sim / "particles.mrcs")
    star = folder / "particles.star"
    star.write_text("\n".join(rows) + "\n")
    for argv in (["info", str(star)],
                 ["reconstruct", str(star), "--out", str(tmp_path / "r"), *FAST],
                 ["reconstruct", str(sim / "particles.star"), "--out", str(tmp_path / "r"),
                  *FAST, "--class-file", str(star), "--keep-classes", "1"]):
        refused(capsys, argv, str(star), "rlnDefocusU", "more than once")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["missing", "short", "truncated"])
def test_info_exits_2_on_unusable_stacks(sim, tmp_path, capsys, kind):
    folder = tmp_path / "data"
    folder.mkdir()
    star = folder / "particles.star"
    shutil.copy(sim / "particles.star", star)
    stack = (sim / "particles.mrcs").read_bytes()
    if kind == "short":  # a valid stack of 100 images where 200 are named
        with mrcfile.new(folder / "particles.mrcs") as mrc:
            mrc.set_data(np.zeros((100, 32, 32), np.float32))
    elif kind == "truncated":
        (folder / "particles.mrcs").write_bytes(stack[: len(stack) // 2])
    code = main(["info", str(star)])
    out, err = capsys.readouterr()
    assert code == 2 and "Usable:             no" in out  # the description is kept
    assert err.count("\n") == 1 and str(star) in err and "image stacks" in err


def test_info_of_a_folder(sim, capsys):
    refused(capsys, ["info", str(sim)], str(sim), "is a folder")


# ------------------------------------------------------------------ maps: fsc (1, 12)
# ------------------------------------------------------------------ small things (13-17)
@pytest.mark.parametrize("extra", [[], ["--box", "28", "--max-freq", "0.2"], ["baseline"]])
def test_nan_pixel_names_the_image_as_the_file_does(sim, tmp_path, capsys, extra):
    folder = tmp_path / "nan"
    folder.mkdir()
    data = mrcfile.read(sim / "particles.mrcs").copy()
    data[150, 3, 4] = np.nan
    write_volume(folder / "particles.mrcs", data)
    shutil.copy(sim / "particles.star", folder / "particles.star")
    star, out = folder / "particles.star", tmp_path / "run"
    if extra == ["baseline"]:
        argv = ["baseline", "em", str(star), "--out", str(out), "--max-freq", "0.15",
                "--test-size", "5", "--iterations", "1", "--quiet"]
    else:
        argv = ["reconstruct", str(star), "--out", str(out), *FAST, *extra]
    refused(capsys, argv, str(star), "image 151@particles.mrcs", "row 151", "NaN")
    assert not out.exists()


def test_disk_full_while_writing_outputs(sim, tmp_path, capsys, monkeypatch):
    """A write that fails at the end: one line, and no map.mrc nor temporaries left."""
    import errno

    import cryostoch.engine.outputs as outputs

    def full(path, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "write_metrics", full)
    out = tmp_path / "run"
    refused(capsys, reconstruct_argv(sim, out), "No space left on device")
    assert not (out / "map.mrc").exists() and not (out / "config.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_killed_simulation_leftovers_are_cleaned(tmp_path):
    out = tmp_path / "sim"
    out.mkdir()
    stale = out / ".particles.mrcs.abc123.partial"  # what a kill -9 leaves
    stale.write_bytes(b"half a stack")
    assert main(["simulate", "--volume", "phantom", "--n-particles", "10", "--box", "32",
                 "--pixel-size-a", "8", "--out", str(out), "--montage", "0", "--quiet"]) == 0
    assert not stale.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_random_bytes_cs_file(tmp_path, capsys):
    path = tmp_path / "particles.cs"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    message = refused(capsys, ["info", str(path)], str(path), "not a numpy array file")
    assert "pickle" not in message


def test_warnings_do_not_come_with_an_error(sim, tmp_path, capsys, monkeypatch):
    """A warning raised on the way to an InputError is not printed beside the one line."""
    import cryostoch.engine.checks as checks

    original = checks.check_before_work

    def warn_then_check(*args):
        np.log(np.zeros(1))  # numpy: RuntimeWarning, divide by zero
        warnings.warn("on the way", RuntimeWarning, stacklevel=1)
        original(*args)

    def to_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr("cryostoch.engine.prepare.check_before_work", warn_then_check)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = to_stderr  # as outside pytest, which records them instead
        refused(capsys, reconstruct_argv(sim, tmp_path / "run", "--epochs", "1e-9"), "--epochs")


@pytest.mark.parametrize("kind", ["particles", "stack"])
def test_class_file_that_is_not_a_classification(sim, tmp_path, capsys, kind):
    class_file = sim / ("particles.star" if kind == "particles" else "particles.mrcs")
    out = tmp_path / "run"
    refused(capsys, reconstruct_argv(sim, out, "--class-file", str(class_file),
                                     "--keep-classes", "1"), str(class_file))
    assert not out.exists()


def test_failed_simulation_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import errno

    import cryostoch.simulate.run as run

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run, "write_particle_stack", full)
    out = tmp_path / "sim"
    refused(capsys, ["simulate", "--volume", "phantom", "--n-particles", "10", "--box", "32",
                     "--pixel-size-a", "8", "--out", str(out), "--quiet"], "No space left")
    assert not out.exists()
