"""Data parallel runs under torchrun (gloo on the CPU): the shares of a minibatch, the sums
over shares, and whole runs with 1 and 2 processes that must agree and resume each other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_ctf
from cryostoch.cli.main import main
from cryostoch.engine.config import ReconstructionConfig
from cryostoch.engine.distributed import World, share_bounds, world_from_env
from cryostoch.errors import InputError
from cryostoch.evaluate.fsc import fourier_shell_correlation
from cryostoch.fourier.resample import soft_low_pass
from cryostoch.io.mrc import read_map, write_map
from cryostoch.model.likelihood import LikelihoodConfig, MarginalLikelihood
from cryostoch.model.objective import minibatch_objective
from cryostoch.model.prior import PriorConfig
from distributed_support import (
    ROOT,
    fsc_inside_cutoff,
    launch,
    needs_torchrun,
    reconstruct_args,
    simulated_particles,
)


# ------------------------------------------------------------------ shares of a minibatch
@pytest.mark.parametrize("n", [0, 1, 5, 20, 101])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shares_cover_every_row_once_in_order(n, size):
    bounds = [share_bounds(n, rank, size) for rank in range(size)]
    rows = [i for start, stop in bounds for i in range(start, stop)]
    assert rows == list(range(n))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1


def test_world_share_of_tensors_and_arrays():
    rows = torch.tensor([7, 3, 9, 1, 4])
    assert World(0, 2).share(rows).tolist() == [7, 3]
    assert World(1, 2).share(rows).tolist() == [9, 1, 4]
    assert World(1, 2).share(np.arange(4)).tolist() == [2, 3]
    assert World().share(rows) is not None and World().share(rows).tolist() == rows.tolist()
    with pytest.raises(ValueError):
        share_bounds(3, 2, 2)


def test_one_process_world_is_a_no_op():
    world = World()
    x = torch.arange(4.0)
    assert world.sum_(x) is x and x.tolist() == [0, 1, 2, 3]
    assert world.sum_float(2.5) == 2.5
    assert world.gathered_rows(4, x) is x
    assert world.on_main(lambda: 3) == 3
    world.check_same(x, "x")


def test_world_from_torchrun_variables():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert world_from_env("cpu", env) == World(3, 4, 1, "cpu")
    assert world_from_env("cuda", env).device == "cuda:1"
    assert world_from_env("cuda:0", {}) == World(device="cuda:0")  # no torchrun: as given
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES"):
        world_from_env("cuda:0", env)


def test_sum_over_shares_gives_the_whole_minibatch():
    """The objective of a minibatch evaluated in two shares whose sums are added (as an
    all-reduce would) equals the objective of the whole minibatch evaluated at once."""
    model = MarginalLikelihood(LikelihoodConfig(box_size=16, pixel_size_a=4.0,
                                                max_radius_px=3.0), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(16, 16, 16, generator=g, dtype=torch.float64)
    images = torch.randn(6, 16, 16, generator=g, dtype=torch.float64)
    blocks, ctf, prior = model.image_blocks(images), random_ctf(6, 1), PriorConfig()
    whole = minibatch_objective(volume, blocks, ctf, model, prior, 100)
    second: list[torch.Tensor] = []  # share 2's sums, in the order they are reduced
    minibatch_objective(volume, blocks[4:], ctf.index(slice(4, 6)), model, prior, 100,
                        batch_total=6, sum_over_shares=lambda t: second.append(t.clone()) or t)
    sums = iter(second)
    first = minibatch_objective(volume, blocks[:4], ctf.index(slice(0, 4)), model, prior, 100,
                                batch_total=6, sum_over_shares=lambda t: t + next(sums))
    torch.testing.assert_close(first.gradient, whole.gradient, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(first.value, whole.value, rtol=1e-12, atol=0.0)


# ------------------------------------------------------------------ whole runs under torchrun
@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    return simulated_particles(tmp_path_factory.mktemp("distributed") / "sim")


@pytest.fixture(scope="module")
def runs(particles, tmp_path_factory) -> dict[int, Path]:
    """The same reconstruction with 1 and with 2 processes."""
    folder = tmp_path_factory.mktemp("runs")
    for n in (1, 2):
        launch(n, *reconstruct_args(particles, folder / f"ranks{n}"))
    return {n: folder / f"ranks{n}" for n in (1, 2)}


@needs_torchrun
def test_two_processes_give_the_map_of_one(runs):
    """Only the order of the sums differs (two partial sums all-reduced instead of one sum over
    the minibatch), so the maps agree to rounding."""
    fsc = fsc_inside_cutoff(runs[1], runs[2])
    assert (fsc > 0.99).all(), fsc
    info = {n: json.loads((runs[n] / "config.json").read_text()) for n in (1, 2)}
    assert (info[1]["world_size"], info[2]["world_size"]) == (1, 2)
    # rank 0 alone wrote: one set of outputs, no temporaries of another rank
    assert sorted(p.name for p in runs[2].iterdir()) == sorted(p.name for p in runs[1].iterdir())


@pytest.mark.slow  # about 30 s here
@needs_torchrun
def test_noise_update_and_classes_with_two_processes_match_one(particles, tmp_path):
    """The noise re-estimation's residuals and the class counts are summed over the ranks:
    in float64 the class maps agree to rounding."""
    for n in (1, 2):
        launch(n, *reconstruct_args(particles, tmp_path / f"ranks{n}", "--noise-update",
                                    "--classes", "2", "--dtype", "float64"))
    for name in ("class_01.mrc", "class_02.mrc"):
        a, _ = read_map(tmp_path / "ranks1" / name)
        b, _ = read_map(tmp_path / "ranks2" / name)
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), name
    info = [json.loads((tmp_path / f"ranks{n}" / "config.json").read_text()) for n in (1, 2)]
    assert info[0]["classes"] == info[1]["classes"]
    assert info[0]["noise_variance_per_shell"] == info[1]["noise_variance_per_shell"]


@needs_torchrun
def test_refusals_under_torchrun_print_one_error_line(particles, runs, tmp_path):
    """An error rank 0 meets alone (a folder that holds a run) and one every rank meets (too
    small a minibatch): one `cryostoch: error` line, a failed exit, no folder created."""
    for args, names in ((reconstruct_args(particles, runs[1]), (str(runs[1]), "--overwrite")),
                        (reconstruct_args(particles, tmp_path / "new", "--batch-size", "1"),
                         ("--batch-size", "2 processes"))):
        done = launch(2, *args, check=False)
        errors = [line for line in done.stderr.splitlines() if "cryostoch: error" in line]
        assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
        assert all(name in errors[0] for name in names), errors[0]
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # 50-75 s here: four runs of which two stop after 5 steps
@needs_torchrun
def test_checkpoints_resume_across_process_counts(particles, runs, tmp_path):
    """A run stopped after 5 steps with 2 processes finishes with 1, and one stopped with 1
    finishes with 2; both end where the uninterrupted runs do."""
    support = str(ROOT / "tests" / "distributed_support.py")
    for before, after in ((2, 1), (1, 2)):
        out = tmp_path / f"{before}to{after}"
        args = reconstruct_args(particles, out)
        config = ReconstructionConfig(
            particles=str(particles), out_dir=str(out), epochs=1.0, batch_size=20, test_size=20,
            shift_range_a=0.0, seed=3, checkpoint_interval_s=0.0)
        settings = tmp_path / f"{before}to{after}.json"
        settings.write_text(json.dumps(config.to_dict()))
        launch(before, support, str(settings), "5")
        assert (out / "checkpoint.pt").exists() and not (out / "map.mrc").exists()
        launch(after, *args, "--resume")
        resumed, whole = (np.genfromtxt(run / "metrics.csv", delimiter=",", names=True)
                          for run in (out, runs[after]))
        assert np.array_equal(resumed["gradient_evaluations"], whole["gradient_evaluations"])
        np.testing.assert_allclose(resumed["test_nll"], whole["test_nll"], rtol=1e-4)
        assert (fsc_inside_cutoff(runs[after], out) > 0.99).all()


@needs_torchrun
@pytest.mark.parametrize("method", ["em", "projmatch"])
def test_baselines_with_two_processes_give_the_map_of_one(particles, tmp_path, method):
    """Each rank back-projects its share of the images; the sums are all-reduced before the
    closed-form M-step."""
    for n in (1, 2):
        launch(n, "baseline", method, str(particles), "--out", str(tmp_path / f"ranks{n}"),
               "--iterations", "2", "--test-size", "20", "--shift-range-a", "0", "--threads",
               "1", "--quiet")
    assert (fsc_inside_cutoff(tmp_path / "ranks1", tmp_path / "ranks2") > 0.99).all()
    nll = [np.genfromtxt(tmp_path / f"ranks{n}" / "metrics.csv", delimiter=",",
                         names=True)["test_nll"] for n in (1, 2)]
    np.testing.assert_allclose(nll[0], nll[1], rtol=1e-6)


@needs_torchrun
def test_refine_with_two_processes_gives_the_half_maps_of_one(tmp_path):
    """Each rank searches its share of each half's particles; the back-projections and the
    new poses are all-reduced. The final iteration reconstructs to N/2 - 1: compare there."""
    sim = tmp_path / "sim"
    assert main(["simulate", "--volume", "phantom", "--n-particles", "300", "--box", "32",
                 "--pixel-size-a", "8", "--snr", "1", "--shift-sigma-a", "3", "--out", str(sim),
                 "--montage", "0", "--quiet"]) == 0
    truth, _ = read_map(sim / "ground_truth.mrc")
    write_map(sim / "start.mrc", soft_low_pass(truth.double(), 32 * 8 / 40, 2.0, ndim=3), 8.0)
    for n in (1, 2):
        launch(n, "refine", str(sim / "particles.star"), "--init", str(sim / "start.mrc"),
               "--out", str(tmp_path / f"ranks{n}"), "--initial-resolution-a", "40",
               "--iterations", "2", "--global-searches", "1", "--threads", "1", "--quiet")
    for name in ("half1.mrc", "half2.mrc"):
        a, _ = read_map(tmp_path / "ranks1" / name)
        b, _ = read_map(tmp_path / "ranks2" / name)
        shells, fsc = fourier_shell_correlation(a.double(), b.double())
        assert (fsc[shells < 16] > 0.99).all(), (name, fsc)
    record = json.loads((tmp_path / "ranks2" / "refine.json").read_text())
    assert record["world_size"] == 2
